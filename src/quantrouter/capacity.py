"""The node tier's report: this router's view of its node, streamed to fleet routers (`WatchCapacity`).

A report carries what the policy needs to price every variant on this node from afar: memory and
its source, residency, speed estimates with sample counts, the architecture for the KV-cache
estimate, and the load (streams in flight, expected seconds of work ahead). It goes out when it
changes (checked every `CHANGE_POLL_S`) and at least every `interval`, so a silent stream means a
node in trouble. Like service.py, this is a wire edge: it builds protobuf from the router's values.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

from google.protobuf import duration_pb2

from quantrouter.listing import variant_row
from quantrouter.memory import MemorySnapshot
from quantrouter.policy import CandidateInput, InFlight
from quantrouter.router import Router
from quantrouter.units import NS
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.values import Variant

__all__ = ["DEFAULT_INTERVAL_S", "SCHEMA_VERSION", "capacity_of", "changed", "duration_fields", "duration_pb",
           "memory_status_pb", "node_capacity", "variant_pb", "watch"]

# Bump when a field changes meaning; readers refuse versions they do not know.
SCHEMA_VERSION = 1
# The longest silence between reports unless the reader asks otherwise; a fleet router calls a node
# stale after a few of these.
DEFAULT_INTERVAL_S = 2.0
# A reader cannot ask for reports more often than this.
MIN_INTERVAL_S = 0.1
# How often the state is compared with the last report: the memory probe samples at ≤ 4 Hz.
CHANGE_POLL_S = 0.25
# Backlog changes continuously; a report for it alone waits until it moved by this many seconds.
BACKLOG_STEP_S = 1.0


def duration_fields(seconds: float) -> dict[str, int]:
    """A Duration's fields, for the initialiser of the message holding it: protobuf builds it in place, where a
    `duration_pb` passed in is built through Python's `FromNanoseconds` and then copied (a decision message has
    four per candidate: about 1 µs each saved). Seconds and nanos carry the same sign, as Duration requires."""
    nanos = int(seconds * NS)
    whole, part = divmod(abs(nanos), NS)
    return {"seconds": whole, "nanos": part} if nanos >= 0 else {"seconds": -whole, "nanos": -part}


def duration_pb(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(**duration_fields(seconds))


def variant_pb(v: Variant) -> pb.Variant:
    return pb.Variant(tag=v.tag, quantization=v.quantization, size_bytes=v.size_bytes,
                      parameter_count=v.parameter_count, resident=v.resident, vram_bytes=v.vram_bytes,
                      tokens_per_second=v.tokens_per_second, samples=v.samples, quality=v.quality,
                      tokens_per_second_measured=v.measured, quality_measured=v.quality_measured)


def memory_status_pb(memory: MemorySnapshot) -> pb.MemoryStatus:
    return pb.MemoryStatus(source=memory.source, free_bytes=memory.free_bytes, total_bytes=memory.total_bytes,
                           detail=memory.detail,
                           gpus=[pb.GpuMemory(uuid=g.uuid, name=g.name, free_bytes=g.free_bytes,
                                              total_bytes=g.total_bytes) for g in memory.gpus])


def capacity_of(router: Router) -> pb.NodeCapacity:
    """The node's state now, with `sequence` left at 0 for the stream to fill in."""
    catalog = router.inventory.snapshot
    view = router.memory_view()
    return node_capacity(router.probe.latest, view.reserve_bytes,
                         {family: router.candidates(catalog, family) for family in catalog.families},
                         dict(catalog.names or {}), router.in_flight, view.backlog,
                         router.inventory.backend_up, router.limits.max_in_flight, view.in_flight, view.offered_load)


def node_capacity(memory: MemorySnapshot, reserve_bytes: int, families: Mapping[str, Sequence[CandidateInput]],
                  names: Mapping[str, str], in_flight: int, backlog: Sequence[float], backend_up: bool,
                  max_in_flight: int, streams: Sequence[InFlight] = (), offered_load: float = 0.0) -> pb.NodeCapacity:
    """A report from plain values: the candidates, the backlog (each stream's remaining seconds), the streams'
    SLOs and the offered load, as the node's policy prices a request with them (the fleet simulator reports its
    simulated nodes through this too)."""
    variants = []
    for family, candidates in families.items():
        for c in candidates:
            v, speed, arch = c.variant, c.speed, c.variant.architecture
            variants.append(pb.NodeVariant(
                variant=variant_pb(variant_row(v, speed, (c.quality, c.quality_measured))),
                family=family, prompt_tokens_per_second=speed.prompt_tps,
                load_duration=duration_pb(speed.load_seconds),
                architecture=pb.Architecture(name=arch.name, block_count=arch.block_count,
                                             head_count_kv=arch.head_count_kv, head_dim=arch.head_dim,
                                             context_length=arch.context_length,
                                             embedding_length=arch.embedding_length, head_count=arch.head_count,
                                             vocab_size=arch.vocab_size) if arch else None,
                in_flight=c.in_flight, breaker_open=c.breaker_open, queued_seconds=c.queued_seconds))
    return pb.NodeCapacity(
        schema_version=SCHEMA_VERSION, memory=memory_status_pb(memory), reserve_bytes=reserve_bytes,
        variants=variants, names=dict(names), in_flight=in_flight, backlog_seconds=sum(backlog),
        stream_backlog_seconds=sorted(backlog), backend_up=backend_up, max_in_flight=max_in_flight,
        streams=[pb.StreamInFlight(service_seconds=f.service_seconds, done=f.done,
                                   tokens_per_second=f.tokens_per_second, time_left_seconds=f.time_left,
                                   min_tokens_per_second=f.min_tokens_per_second) for f in streams],
        offered_load=offered_load)


def _steady(report: pb.NodeCapacity) -> pb.NodeCapacity:
    """The report without the fields that change on every read (sequence, backlog, streams, offered load)."""
    copy = pb.NodeCapacity()
    copy.CopyFrom(report)
    copy.sequence = 0
    copy.backlog_seconds = 0.0
    copy.offered_load = 0.0
    del copy.stream_backlog_seconds[:]
    del copy.streams[:]
    for variant in copy.variants:
        variant.queued_seconds = 0.0
    return copy


def changed(old: pb.NodeCapacity, new: pb.NodeCapacity) -> bool:
    """Whether `new` is worth sending after `old`: anything but the sequence and the backlog figures changed,
    or the summed backlog moved by `BACKLOG_STEP_S` or more."""
    if abs(old.backlog_seconds - new.backlog_seconds) >= BACKLOG_STEP_S:
        return True
    return bool(_steady(old) != _steady(new))


async def watch(router: Router, interval: float) -> AsyncIterator[pb.NodeCapacity]:
    """Reports on change and at least every `interval` seconds, until the caller goes away."""
    interval = max(interval, MIN_INTERVAL_S)
    loop = asyncio.get_running_loop()
    sequence = 0
    last: pb.NodeCapacity | None = None
    sent_at = 0.0
    while True:
        report = capacity_of(router)
        if last is None or changed(last, report) or loop.time() - sent_at >= interval:
            sequence += 1
            last = report
            sent_at = loop.time()
            report.sequence = sequence
            yield report
        await asyncio.sleep(min(CHANGE_POLL_S, interval))
