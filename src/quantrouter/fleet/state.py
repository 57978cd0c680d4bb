"""A node's reported state, read from its `NodeCapacity` report and checked before anything trusts it.

A report is turned into the policy's own values (`VariantInfo`, `SpeedEstimate`, a `MemoryView`), so
the fleet prices a node's variants with exactly the numbers its node router would use. A report that
cannot be true (negative or impossible memory, speeds that are not positive finite numbers, a schema
version this reader does not know, an unknown quantization) raises `ReportRejected`: the node is then
marked unhealthy, never half-trusted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from quantrouter.capacity import SCHEMA_VERSION
from quantrouter.catalog import Architecture, Resolution, VariantInfo
from quantrouter.memory import NVML, GpuMemory, MemorySnapshot
from quantrouter.policy import LOAD_WINDOW_S, CandidateInput, InFlight, MemoryView, remaining
from quantrouter.quant import UnknownQuantizationError, parse_quantization
from quantrouter.throughput import SpeedEstimate
from quantrouter.v1 import router_service_pb2 as pb

__all__ = ["NodeState", "ReportRejected", "Routed", "read_report", "same_report", "with_routed"]


class ReportRejected(ValueError):
    """A report that cannot be trusted; `reason` is a bounded metric label, the message says what is wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class NodeState:
    """What one node reported last, as plain values."""

    memory: MemorySnapshot
    reserve_bytes: int
    candidates: tuple[CandidateInput, ...]
    names: Mapping[str, str] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    backend_up: bool = True
    sequence: int = 0
    backlog: tuple[float, ...] = ()  # each stream's expected remaining seconds, ascending
    streams: tuple[InFlight, ...] = ()  # the same streams with their SLOs
    offered_load: float = 0.0
    # Built once with the state (a report, or `with_routed`), not on every pick that reads them.
    memory_view: MemoryView = field(init=False, repr=False, compare=False)
    _families: Mapping[str, tuple[CandidateInput, ...]] = field(init=False, repr=False, compare=False)
    _by_tag: Mapping[str, CandidateInput] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        families: dict[str, list[CandidateInput]] = {}
        for c in self.candidates:
            families.setdefault(c.variant.family, []).append(c)
        object.__setattr__(self, "memory_view", MemoryView(
            self.memory.free_bytes, self.reserve_bytes, self.memory.source, self.backlog, self.streams,
            self.offered_load, shared=self.memory.source == NVML))
        object.__setattr__(self, "_families", {name: tuple(group) for name, group in families.items()})
        object.__setattr__(self, "_by_tag", {c.variant.tag: c for c in self.candidates})

    @property
    def backlog_seconds(self) -> float:
        """Expected seconds of decoding ahead of the streams in progress (their remaining seconds, summed)."""
        return sum(self.backlog)

    @property
    def at_limit(self) -> bool:
        """At its in-flight limit: the node router sheds new streams."""
        return bool(self.max_in_flight) and self.in_flight >= self.max_in_flight

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self._families)

    def resolve(self, model: str) -> Resolution | None:
        """What `model` names on this node, as its catalog would resolve it (`CatalogSnapshot.resolve`), from the
        indexes the report built: a node's report changes with every stream it starts and ends, and building a
        catalog for each new one took the fleet router 10 µs on most requests' path."""
        if model in self.names:
            return Resolution(self.names[model])
        pinned = self._by_tag.get(model)
        return Resolution(pinned.variant.family, pinned.variant.tag) if pinned is not None else None

    def family(self, family: str) -> tuple[CandidateInput, ...]:
        return self._families.get(family, ())

    def candidate(self, tag: str) -> CandidateInput | None:
        return self._by_tag.get(tag)

    @property
    def gpu_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.memory.gpus)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _seconds(value: float) -> bool:
    return math.isfinite(value) and value >= 0


# Each check raises with its message built only when it fails: formatting every figure of every report
# up front was most of the cost of reading one.
def _candidate(item: pb.NodeVariant) -> CandidateInput:
    v = item.variant
    if not (v.tag and item.family):
        raise ReportRejected("bad_variant", "a variant without a tag or a family")
    try:
        quant = parse_quantization(v.quantization)
    except UnknownQuantizationError as error:
        raise ReportRejected("bad_variant", f"{v.tag}: {error}") from None
    if not (v.size_bytes > 0 and v.vram_bytes >= 0 and v.parameter_count >= 0):
        raise ReportRejected("bad_variant",
                             f"{v.tag}: size {v.size_bytes}, VRAM {v.vram_bytes}, parameters {v.parameter_count}")
    load = item.load_duration.ToNanoseconds() / 1e9
    if not (_positive(v.tokens_per_second) and _positive(item.prompt_tokens_per_second)
            and math.isfinite(load) and load >= 0 and v.samples >= 0):
        raise ReportRejected("bad_speed", f"{v.tag}: {v.tokens_per_second} tok/s, prompt "
                             f"{item.prompt_tokens_per_second} tok/s, load {load} s, {v.samples} samples")
    if not (0 <= v.quality <= 1 and item.in_flight >= 0):
        raise ReportRejected("bad_variant", f"{v.tag}: quality {v.quality}, {item.in_flight} in flight")
    if not _seconds(item.queued_seconds):
        raise ReportRejected("bad_load", f"{v.tag}: {item.queued_seconds} s queued")
    arch = None
    if item.HasField("architecture"):
        a = item.architecture
        if min(a.block_count, a.head_count_kv, a.head_dim, a.context_length) < 0:
            raise ReportRejected("bad_variant", f"{v.tag}: negative architecture figures")
        arch = _shared(Architecture(a.name, a.block_count, a.head_count_kv, a.head_dim, a.context_length,
                                    a.embedding_length, a.head_count, a.vocab_size))
    info = VariantInfo(v.tag, item.family, quant, v.size_bytes, v.parameter_count, arch, v.resident, v.vram_bytes)
    speed = SpeedEstimate(v.tokens_per_second, item.prompt_tokens_per_second, load, v.samples,
                          v.tokens_per_second_measured)
    return CandidateInput(info, speed, v.quality, item.in_flight, item.breaker_open, item.queued_seconds,
                          quality_measured=v.quality_measured)


def _shared(arch: Architecture) -> Architecture:
    """One object for equal architectures: the policy's per-decision cache of context bytes goes by identity, so a
    family's variants on a node share one entry; a copy each missed it and hashed the architecture instead (7 % of a
    fleet choice over three nodes of three variants)."""
    shared = _architectures.setdefault(arch, arch)
    if len(_architectures) > _KNOWN_MAX:
        del _architectures[next(iter(_architectures))]  # the oldest; sharing it again only costs a lookup
    return shared


# Variants read lately, by their wire bytes: between two reports of a node most of its variants are unchanged
# (only the busy ones' load moves), and a variant's bytes decide what it reads as. Bounded: a fleet of 8 nodes
# with 8 variants each, and their load changes, stay far below it. Module-level on purpose, shared by every
# fleet router in the process: each value is frozen and a function of its key alone, so sharing can cost
# memory (bounded) but never carry one node's or one router's state into another's reading; an object per
# router would only duplicate identical entries. The cache is part of what took read_report to 0.37× of the
# older code's time (bench/results/fleet_choice.md).
_KNOWN_MAX = 4096
_known: dict[bytes, CandidateInput] = {}
# The architectures read lately (`_shared`), bounded alike.
_architectures: dict[Architecture, Architecture] = {}


def _known_candidate(item: pb.NodeVariant) -> CandidateInput:
    """`_candidate(item)`, read once for each distinct variant (one that is rejected is never kept)."""
    key = item.SerializeToString()
    candidate = _known.get(key)
    if candidate is None:
        candidate = _known[key] = _candidate(item)
        if len(_known) > _KNOWN_MAX:
            del _known[next(iter(_known))]  # the oldest
    return candidate


def read_report(report: pb.NodeCapacity) -> NodeState:
    """The report as plain values, or `ReportRejected` saying why it cannot be trusted."""
    if report.schema_version != SCHEMA_VERSION:
        raise ReportRejected("schema_version", f"schema version {report.schema_version}, this fleet router reads "
                             f"version {SCHEMA_VERSION}")
    m = report.memory
    gpus = tuple(GpuMemory(g.uuid, g.name, g.free_bytes, g.total_bytes) for g in m.gpus)
    if not (all(0 <= g.free_bytes <= g.total_bytes for g in gpus) and report.reserve_bytes >= 0):
        raise ReportRejected("bad_memory", "memory figures out of range: " + ", ".join(
            f"{g.name or g.uuid} {g.free_bytes} free of {g.total_bytes}" for g in gpus)
            + f", reserve {report.reserve_bytes}")
    if not (gpus and sum(g.free_bytes for g in gpus) == m.free_bytes):
        raise ReportRejected("bad_memory", f"free memory {m.free_bytes} does not add up over {len(gpus)} devices")
    backlog = tuple(sorted(report.stream_backlog_seconds))
    if not (report.in_flight >= 0 and report.max_in_flight >= 0 and _seconds(report.backlog_seconds)
            and all(_seconds(b) for b in backlog)):
        raise ReportRejected("bad_load", f"{report.in_flight} in flight of {report.max_in_flight}, backlog "
                             f"{report.backlog_seconds} s over streams {list(backlog)}")
    streams = tuple(_stream(item) for item in report.streams)
    if not _seconds(report.offered_load):
        raise ReportRejected("bad_load", f"offered load {report.offered_load}")
    candidates = tuple(_known_candidate(item) for item in report.variants)
    if len({c.variant.tag for c in candidates}) != len(candidates):
        raise ReportRejected("bad_variant", "a tag listed twice")
    return NodeState(MemorySnapshot(m.source, gpus, m.detail), report.reserve_bytes, candidates, dict(report.names),
                     report.in_flight, report.max_in_flight, report.backend_up, report.sequence, backlog, streams,
                     report.offered_load)


def same_report(last: pb.NodeCapacity, report: pb.NodeCapacity) -> bool:
    """Whether `report` says nothing that `last` did not, its sequence number aside: a node reports at least every
    interval, changed or not, and such a report need not be read again.

    It sets `report.sequence` to `last`'s for one whole-message comparison (in C) and puts it back before it
    returns, on purpose: comparing a copy instead took 1.5× as long (14 against 9 µs for 8 variants, measured
    here), on every report of every node. The caller must own `report` meanwhile (the node set's subscription
    task owns each one it receives)."""
    sequence = report.sequence
    report.sequence = last.sequence
    try:
        return bool(report == last)
    finally:
        report.sequence = sequence


def _stream(item: pb.StreamInFlight) -> InFlight:
    time_left = item.time_left_seconds if item.HasField("time_left_seconds") else None
    if not (_seconds(item.service_seconds) and 0 <= item.done <= 1 and _seconds(item.tokens_per_second)
            and _seconds(item.min_tokens_per_second) and (time_left is None or math.isfinite(time_left))):
        raise ReportRejected("bad_load", f"a stream of {item.service_seconds} s, {item.done} done, "
                             f"{item.tokens_per_second} tok/s, {time_left} s left, floor "
                             f"{item.min_tokens_per_second} tok/s")
    return InFlight(item.service_seconds, item.done, item.tokens_per_second, time_left, item.min_tokens_per_second)


@dataclass(frozen=True, slots=True)
class Routed:
    """A stream this fleet router sent to a node after the node's last report was built: the variant, the
    service seconds the fleet expected (alone on the GPU, queue left out), its decode rate, and the SLO it
    carries (seconds left to its deadline now, its rate floor)."""

    tag: str
    service_seconds: float
    tokens_per_second: float
    time_left: float | None = None
    min_tokens_per_second: float = 0.0


def with_routed(state: NodeState, routed: Sequence[Routed]) -> NodeState:
    """`state` with the streams this router sent since the report: a report is up to a poll period old, and a
    router blind to its own last picks sends a burst's arrivals to the same runner's queue one after another.
    Each stream counts as its node router will count it: in flight on its variant, queued behind the ones
    there, in the backlog and the offered load."""
    if not routed:
        return state
    extra: dict[str, tuple[int, float]] = {}
    left = [remaining(r.service_seconds, 0.0, r.time_left) for r in routed]
    for r, seconds_left in zip(routed, left, strict=True):
        n, seconds = extra.get(r.tag, (0, 0.0))
        extra[r.tag] = (n + 1, seconds + seconds_left)
    candidates = tuple(replace(c, in_flight=c.in_flight + extra[c.variant.tag][0],
                               queued_seconds=c.queued_seconds + extra[c.variant.tag][1])
                       if c.variant.tag in extra else c for c in state.candidates)
    streams = tuple(InFlight(r.service_seconds, 0.0, r.tokens_per_second, r.time_left, r.min_tokens_per_second)
                    for r in routed)
    added = sum(r.service_seconds for r in routed)
    return replace(state, candidates=candidates, in_flight=state.in_flight + len(routed),
                   backlog=tuple(sorted((*state.backlog, *left))),
                   streams=(*state.streams, *streams), offered_load=state.offered_load + added / LOAD_WINDOW_S)
