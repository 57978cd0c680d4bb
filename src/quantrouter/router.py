"""The request path without gRPC: decide, forward with one fallback, relay, measure, record.

`Router.decide` gathers plain values (catalog, memory, speeds) and calls the pure policy.
`Router.stream` yields the decision, then text, then a `Completion`; if the chosen variant fails
before its first token it yields a second, `fallback` decision and tries the next candidate once.
Its `finally` releases the in-flight slot and records metrics even when the caller cancels.

The router is typed against two seams: a `Backend` (backend.py; `OllamaBackend` in production) and a
`Recorder` (below; `metrics.Metrics` records for Prometheus), so it can be tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from array import array
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import grpc

from quantrouter.backend import Backend, Final
from quantrouter.breaker import Breaker
from quantrouter.calibration import MeasuredQuality, quality_of
from quantrouter.catalog import CatalogSnapshot, VariantInfo
from quantrouter.config import LimitSettings
from quantrouter.errors import (
    BackendBusy,
    BackendError,
    BackendFailed,
    BackendModelMissing,
    BackendRejected,
    BackendUnavailable,
    ConstraintsUnsatisfiable,
    DeadlinePredicted,
    ModelNotFound,
    NoVariantFits,
    Overloaded,
    QuantrouterError,
    reporting_status,
)
from quantrouter.inventory import Inventory
from quantrouter.loads import LoadsStarted
from quantrouter.memory import NVML, MemoryProbe
from quantrouter.metrics import OTHER, VariantState
from quantrouter.policy import (
    LOAD_WINDOW_S,
    SHARING_LEVELS,
    SURGE_WINDOW_S,
    CandidateInput,
    InFlight,
    MemoryView,
    PolicyConfig,
    RoutingRequest,
    decide,
    queued_by_variant,
    remaining,
    remaining_seconds,
    runners_tolerated,
)
from quantrouter.throughput import Observation, ThroughputSnapshot, ThroughputTable
from quantrouter.units import NS
from quantrouter.values import Completion, Decision, FailureKind, quick_constructor

__all__ = ["Completion", "Job", "Recorder", "Router", "failure_of"]

log = logging.getLogger(__name__)

# Errors before the first token after which another variant is worth trying.
_FALLBACK_ERRORS = (BackendModelMissing, BackendFailed, BackendBusy)
# Errors that say nothing about the variant's health, so they never open its breaker: the backend is
# down for every variant, busy with other work (503: load, not illness), or refused the caller's options.
_NOT_THE_VARIANTS_FAULT = (BackendUnavailable, BackendBusy, BackendRejected)
# The router's back-off hint when it sheds load itself.
OVERLOADED_RETRY_AFTER_S = 0.5
# Built for every variant of a family on each request (without the frozen `__init__`'s per-field cost).
_new_candidate = quick_constructor(CandidateInput)
# The offered load's window is summed in buckets this long.
LOAD_BUCKET_S = 1.0


@dataclass(frozen=True, slots=True)
class Job:
    """What to generate: a prompt, or chat messages, with Ollama options."""

    prompt: str = ""
    system: str = ""
    messages: tuple[Mapping[str, str], ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    format: str = ""
    chat: bool = False


@dataclass(slots=True, eq=False)
class _Work:
    """One in-flight stream as the policy's backlog counts it: the decision's service estimate and the share
    of the requested tokens streamed so far, with the caller's SLO that a new runner must not break: its
    deadline (on the router's clock) and rate floor, and the chosen variant's rate (mutable: the relay counts
    chunks; identity equality, so a set holds each stream once)."""

    tag: str
    service_seconds: float
    num_predict: int
    streamed: int = 0
    tokens_per_second: float = 0.0
    deadline: float | None = None
    min_tokens_per_second: float = 0.0
    peak_runners: int = 1  # the most runners busy, its own included, while it streamed (`Observation`)

    def done(self) -> float:
        return min(self.streamed / self.num_predict, 1.0) if self.num_predict > 0 else 0.0

    def time_left(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now

    def in_flight(self, now: float) -> InFlight:
        return InFlight(self.service_seconds, self.done(), self.tokens_per_second, self.time_left(now),
                        self.min_tokens_per_second)


class LoadWindow:
    """What routings added over the last `LOAD_WINDOW_S` (their service seconds for the offered load, one each for
    the rate of routings with an SLO), in a fixed ring of `LOAD_BUCKET_S` buckets of plain doubles: nothing is kept
    per stream, so its memory does not grow with the request rate, and a burst leaves no object behind that pins
    the allocator's memory afterwards (bench/results/load-1000.md). A routing counts for the window's length, give
    or take one bucket."""

    __slots__ = ("_buckets", "_newest")

    def __init__(self) -> None:
        self._buckets = array("d", [0.0] * math.ceil(LOAD_WINDOW_S / LOAD_BUCKET_S))
        self._newest = -len(self._buckets)  # the newest bucket's number (its start time over LOAD_BUCKET_S)

    def _advance(self, now: float) -> int:
        """The bucket `now` falls in; the ones the window left since the newest are emptied for reuse."""
        current = int(now // LOAD_BUCKET_S)
        size = len(self._buckets)
        for number in range(max(self._newest + 1, current - size + 1), current + 1):
            self._buckets[number % size] = 0.0
        self._newest = max(self._newest, current)
        return current

    def add(self, now: float, service_seconds: float) -> None:
        self._buckets[self._advance(now) % len(self._buckets)] += service_seconds

    def per_second(self, now: float, window: float = LOAD_WINDOW_S) -> float:
        """What was added within the window, or its newest `window` seconds, per second (for service seconds: the
        offered load)."""
        current = self._advance(now)
        if window >= LOAD_WINDOW_S:
            return sum(self._buckets) / LOAD_WINDOW_S
        size = len(self._buckets)
        return sum(self._buckets[(current - i) % size] for i in range(math.ceil(window / LOAD_BUCKET_S))) / window


class SloWindow:
    """Recent routings that carried a deadline or a rate floor, counted by the most runners time-slicing the GPU
    their SLO bears (`runners_tolerated`), one `LoadWindow` per count from 1 to `SHARING_LEVELS`: the callers a new
    runner would hurt. One expected to miss even alone, or bearing more, is not kept (no new runner within what
    Ollama holds changes its outcome)."""

    __slots__ = ("_windows",)

    def __init__(self) -> None:
        self._windows = tuple(LoadWindow() for _ in range(SHARING_LEVELS))

    def add(self, now: float, runners: int) -> None:
        if 1 <= runners <= SHARING_LEVELS:
            self._windows[runners - 1].add(now, 1.0)

    def per_second(self, now: float) -> tuple[float, ...]:
        """`MemoryView.tight_rates`: entry i the routings per second whose SLO bears i + 1 runners."""
        return tuple(window.per_second(now) for window in self._windows)


class Recorder(Protocol):
    """What the router reports as it works; family names arrive already bounded (`family_label`)."""

    def decision_timed(self, seconds: float) -> None: ...

    def decided(self, family: str, tag: str, quantization: str, preference: str, reason: str) -> None: ...

    def substituted(self, family: str, tag: str, kind: str) -> None: ...

    def refused(self, family: str, preference: str, code: str) -> None: ...

    def stream_opened(self, family: str) -> None: ...

    def stream_closed(self, family: str, tag: str, quantization: str, preference: str, code: str,
                      seconds: float) -> None: ...

    def first_token(self, family: str, tag: str, preference: str, seconds: float) -> None: ...

    def fell_back(self, family: str, tag: str, reason: str) -> None: ...

    def breaker_tripped(self, family: str, tag: str) -> None: ...

    def generated(self, family: str, tag: str, quantization: str, prompt_tokens: int, generated_tokens: int,
                  tokens_per_second: float, load_seconds: float | None) -> None: ...


def _variant_labels(variant: VariantInfo | None) -> tuple[str, str]:
    """`target_model_name` and `quantization` label values; `other` before a variant was chosen."""
    return (variant.tag, variant.quant.name) if variant else (OTHER, OTHER)


def failure_of(decision: Decision) -> QuantrouterError:
    """The error for a decision that chose nothing: its status follows from what stood in the way."""
    metadata = {"family": decision.family}
    if decision.failure is FailureKind.MEMORY:
        return NoVariantFits(decision.reason, metadata=metadata)
    if decision.failure is FailureKind.DEADLINE:
        return DeadlinePredicted(decision.reason, metadata={
            **metadata, "predicted": "true", "best_expected_seconds": f"{decision.best_expected_seconds:.3f}"})
    if decision.failure is FailureKind.EMPTY:
        return ModelNotFound(decision.reason, metadata=metadata)
    return ConstraintsUnsatisfiable(decision.reason, metadata=metadata)


async def _sent_while(decision: Decision, relay: AsyncGenerator[str | Completion, None]
                      ) -> AsyncGenerator[Decision | str | Completion, None]:
    """`decision`, then `relay`'s items; the backend request starts while the decision is being sent.

    Sending a message waits on gRPC's completion queue (a thread hop), and the request to the backend waits
    on the network: overlapped, the first token is not held behind the decision. Only the first item is asked
    for early, and if the caller stops here that read is cancelled and the relay closed before this returns,
    so nothing runs on for a client that is gone.
    """
    first = asyncio.ensure_future(anext(relay, None))
    try:
        await asyncio.sleep(0)  # one turn: the request is written before the decision's message is built
        yield decision
        item = await first
        while item is not None:
            yield item
            item = await anext(relay, None)
    finally:
        if not first.done():
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await first
        await relay.aclose()


class Router:
    def __init__(self, backend: Backend, inventory: Inventory, probe: MemoryProbe, throughput: ThroughputTable,
                 metrics: Recorder, limits: LimitSettings, policy: PolicyConfig, reserve_bytes: int,
                 clock: Callable[[], float] = time.monotonic,
                 measured_quality: Mapping[str, MeasuredQuality] | None = None) -> None:
        """`reserve_bytes` is what the backend keeps back on each GPU NVML reports (none on a static capacity)."""
        self.backend = backend
        self.inventory = inventory
        self.probe = probe
        self.throughput = throughput
        self.breaker = Breaker(limits.breaker_failures, limits.breaker_cooldown)
        self.metrics = metrics
        self.limits = limits
        self.policy = policy
        self.reserve_bytes = reserve_bytes
        self._clock = clock
        self.measured_quality = dict(measured_quality or {})
        self._in_flight_tags: Counter[str] = Counter()
        self._in_flight_families: Counter[str] = Counter()
        self._work: set[_Work] = set()
        self._loads = LoadsStarted()
        self._tables: dict[str, tuple[CandidateInput, ...]] = {}
        self._tables_catalog: CatalogSnapshot | None = None
        self._tables_speeds: ThroughputSnapshot | None = None
        self._routed = LoadWindow()  # the service estimates of recent routings
        self._tight = SloWindow()  # recent routings with a deadline or a rate floor (while tight_arrivals is on)
        self.opened = 0  # streams admitted since the start (the allocator trims after enough of them)

    @property
    def in_flight(self) -> int:
        return sum(self._in_flight_families.values())

    def _backlog(self, now: float) -> tuple[float, ...]:
        return remaining_seconds([(w.service_seconds, w.done(), w.time_left(now)) for w in self._work])

    def family_label(self, family: str) -> str:
        """A metric label value: known families only (bounded cardinality)."""
        return family if self.inventory.snapshot.has_family(family) else OTHER

    def quality_of(self, variant: VariantInfo) -> tuple[float, bool]:
        """Measured quality where the calibration file has it, else the quant type's prior; and which."""
        return quality_of(variant, self.measured_quality)

    def candidates(self, catalog: CatalogSnapshot, family: str) -> list[CandidateInput]:
        """The family's candidates: its table (`_family_table`), with what is busy, loading or cooling down now."""
        now = self._clock()
        queued = queued_by_variant((w.tag, remaining(w.service_seconds, w.done(), w.time_left(now)))
                                   for w in self._work)
        loading = self._loads.loading(now, lambda tag: (v := catalog.variant(tag)) is None or v.resident)
        rows = []
        for c in self._family_table(catalog, family):
            tag = c.variant.tag
            in_flight, broken = self._in_flight_tags.get(tag, 0), self.breaker.is_open(tag, now)
            if in_flight or broken or tag in queued or tag in loading:
                c = _new_candidate(c.variant, c.speed, c.quality, in_flight, broken, queued.get(tag, 0.0),
                                   quality_measured=c.quality_measured, loading=tag in loading)
            rows.append(c)
        return rows

    def _family_table(self, catalog: CatalogSnapshot, family: str) -> tuple[CandidateInput, ...]:
        """Each variant of the family with its speed and quality, idle: built once per catalog and speed snapshot
        (a new one follows each catalog change and each completed request), not on every request."""
        speeds = self.throughput.snapshot()
        if catalog is not self._tables_catalog or speeds is not self._tables_speeds:
            self._tables, self._tables_catalog, self._tables_speeds = {}, catalog, speeds
        table = self._tables.get(family)
        if table is None:
            rows = []
            for v, speed in speeds.estimates(catalog.family(family)):
                quality, measured = self.quality_of(v)
                rows.append(_new_candidate(v, speed, quality, quality_measured=measured))
            table = self._tables[family] = tuple(rows)
        return table

    def memory_view(self) -> MemoryView:
        """Free memory, the backlog of this router's own in-flight streams (one GPU's worth of work) with their
        SLOs, the load its recent routings offered (over `LOAD_WINDOW_S` and, where the policy reads a surge, over
        `SURGE_WINDOW_S`), and, where the arrivals charge is on (`tight_arrivals`), how many
        of them per second carried an SLO, by the runners time-slicing the GPU it bears (summing its windows took
        8 µs a decision, for nothing while the charge is off)."""
        snapshot = self.probe.latest
        reserve = self.reserve_bytes * len(snapshot.gpus) if snapshot.source == NVML else 0
        now = self._clock()
        return MemoryView(snapshot.free_bytes, reserve, snapshot.source, self._backlog(now),
                          tuple(w.in_flight(now) for w in self._work), self._routed.per_second(now),
                          shared=snapshot.source == NVML,
                          tight_rates=self._tight.per_second(now) if self.policy.tight_arrivals else (),
                          surge_load=self._routed.per_second(now, SURGE_WINDOW_S) if self.policy.surge_factor else 0.0)

    def decide(self, request: RoutingRequest) -> Decision:
        started = time.perf_counter()
        decision = decide(request, self.candidates(self.inventory.snapshot, request.family), self.memory_view(),
                          self.policy)
        self.metrics.decision_timed(time.perf_counter() - started)
        return decision

    def resolve(self, model: str) -> tuple[str, str | None]:
        """Family and pinned tag for a requested name, or ModelNotFound with what is known."""
        resolution = self.inventory.snapshot.resolve(model)
        if resolution is None:
            known = ", ".join(self.inventory.snapshot.families) or "none yet"
            if not self.inventory.backend_up:
                raise BackendUnavailable(f"the backend is unreachable and {model!r} is not known; try again")
            raise ModelNotFound(f"model {model!r} is not a known family or tag; families: {known}",
                                metadata={"model": model[:64]})
        return resolution.family, resolution.pinned_tag

    def _admit(self, family: str) -> None:
        if self.in_flight >= self.limits.max_in_flight:
            raise Overloaded(f"the router is at its limit of {self.limits.max_in_flight} streams; retry shortly",
                             retry_after=OVERLOADED_RETRY_AFTER_S)
        if self._in_flight_families[family] >= self.limits.max_in_flight_per_family:
            raise Overloaded(f"{family} is at its limit of {self.limits.max_in_flight_per_family} streams; "
                             "retry shortly", retry_after=OVERLOADED_RETRY_AFTER_S)

    def record_decision(self, decision: Decision) -> None:
        chosen = decision.chosen
        variant = self.inventory.snapshot.variant(chosen.tag) if chosen else None
        family = self.family_label(decision.family)
        self.metrics.decided(family, *_variant_labels(variant), decision.preference.value, decision.reason_code)
        if chosen is not None and decision.downgraded:
            self.metrics.substituted(family, chosen.tag, "downgrade")

    async def stream(self, request: RoutingRequest, job: Job) -> AsyncIterator[Decision | str | Completion]:
        family = self.family_label(request.family)
        try:
            self._admit(request.family)
        except Overloaded as error:  # shed before a stream exists, but still a request refused
            self.metrics.refused(family, request.preference.value, error.code.name)
            raise
        started = self._clock()
        self._in_flight_families[request.family] += 1
        self.opened += 1
        self.metrics.stream_opened(family)
        variant: VariantInfo | None = None
        first_token: float | None = None

        def closed(code: grpc.StatusCode) -> None:
            self._in_flight_families[request.family] -= 1
            self.metrics.stream_closed(family, *_variant_labels(variant), request.preference.value, code.name,
                                       self._clock() - started)

        with reporting_status(closed):
            decision = self.decide(request)
            self.record_decision(decision)
            fallback_used = False
            while True:
                variant = self._chosen_variant(decision)
                chosen = decision.chosen
                assert chosen is not None
                deadline = None if request.time_remaining is None else started + request.time_remaining
                work = _Work(variant.tag, chosen.expected_seconds - chosen.queue_seconds, request.num_predict,
                             tokens_per_second=chosen.tokens_per_second, deadline=deadline,
                             min_tokens_per_second=request.min_tokens_per_second)
                now = self._clock()
                self._routed.add(now, work.service_seconds)  # served work, not a dry-run Route
                if self.policy.tight_arrivals and (deadline is not None or request.min_tokens_per_second):
                    self._tight.add(now, runners_tolerated(chosen, request.time_remaining,
                                                           request.min_tokens_per_second))
                if not chosen.resident:  # a load starts, and may outlive this request (`LoadsStarted`)
                    self._loads.started(variant.tag, now, chosen.time_to_first_token)
                relay = _sent_while(decision, self._forward(variant, job, work, cold=not variant.resident))
                try:
                    async with aclosing(relay):  # closed here, not whenever it is collected, if the caller leaves
                        async for item in relay:
                            if isinstance(item, Completion):
                                item = replace(item, time_to_first_token=(first_token or self._clock()) - started)
                            elif isinstance(item, str) and first_token is None:
                                first_token = self._clock()
                                self.metrics.first_token(family, variant.tag, request.preference.value,
                                                         first_token - started)
                            yield item
                    return
                except _FALLBACK_ERRORS as error:
                    if error.started or fallback_used:
                        raise
                    retry = replace(request, excluded=request.excluded | {variant.tag})
                    alternative = self.decide(retry)
                    if alternative.chosen is None:
                        raise  # nothing else to try (a pinned tag): the backend's error says more than "none fit"
                    fallback_used = True
                    log.warning("variant %s failed before its first token, falling back: %s", variant.tag, error)
                    self.metrics.fell_back(family, variant.tag, error.reason)
                    request, decision = retry, alternative
                    self.record_decision(decision)
                    self.metrics.substituted(family, alternative.chosen.tag, "fallback")

    def _chosen_variant(self, decision: Decision) -> VariantInfo:
        if decision.chosen is None:
            raise failure_of(decision)
        variant = self.inventory.snapshot.variant(decision.chosen.tag)
        if variant is None:
            raise BackendModelMissing(f"{decision.chosen.tag} left the catalog")
        return variant

    async def _forward(self, variant: VariantInfo, job: Job, work: _Work,
                       cold: bool) -> AsyncGenerator[str | Completion, None]:
        """Relay one variant's stream. Residency changes only when a stream loads a model (and may evict
        others) or fails, so only those ask the inventory for an early `/api/ps`: one per request would put
        a backend call and a catalog rebuild behind every warm stream."""
        tag = variant.tag
        self._in_flight_tags[tag] += 1
        self._work.add(work)
        self._note_sharing()
        failed = True
        try:
            stream = (self.backend.chat(tag, job.messages, job.options, job.format) if job.chat
                      else self.backend.generate(tag, job.prompt, job.system, job.options, job.format))
            async with aclosing(stream):
                async for item in stream:
                    if isinstance(item, Final):
                        yield self._finish(variant, item, cold, work)
                    else:
                        work.streamed += item.chunks  # a chunk is about a token
                        yield item.text
            failed = False
        except BackendError as error:
            self._loads.gone(tag)
            if not isinstance(error, _NOT_THE_VARIANTS_FAULT) and self.breaker.failure(tag, self._clock()):
                self.metrics.breaker_tripped(self.family_label(variant.family), tag)
            raise
        finally:
            self._in_flight_tags[tag] -= 1
            self._work.discard(work)
            if cold or failed:
                self.inventory.poke()

    def _note_sharing(self) -> None:
        """A stream started: every in-flight stream notes the most runners it shared the GPU with, so that its
        speed sample says whether it ran alone (`Observation`); one pass per stream started."""
        busy = sum(1 for count in self._in_flight_tags.values() if count)
        for w in self._work:
            w.peak_runners = max(w.peak_runners, busy)

    def _finish(self, variant: VariantInfo, final: Final, cold: bool, work: _Work) -> Completion:
        self.breaker.success(variant.tag)
        self.throughput.observe(variant.tag, Observation(final.eval_count, final.eval_duration,
                                                         final.prompt_eval_count, final.prompt_eval_duration,
                                                         final.load_duration, cold, work.peak_runners))
        tps = final.eval_count * NS / final.eval_duration if final.eval_duration else 0.0
        prompt_tps = final.prompt_eval_count * NS / final.prompt_eval_duration if final.prompt_eval_duration else 0.0
        self.metrics.generated(self.family_label(variant.family), variant.tag, variant.quant.name,
                               final.prompt_eval_count, final.eval_count, tps,
                               final.load_duration / NS if cold else None)
        return Completion(variant.tag, final.prompt_eval_count, final.eval_count, tps, prompt_tps, 0.0,
                          final.load_duration / NS, final.total_duration / NS, final.done_reason)

    def variant_states(self) -> list[VariantState]:
        """Every variant in the latest catalog with its speed and breaker state (read at scrape time)."""
        catalog = self.inventory.snapshot
        now = self._clock()
        return [VariantState(family, c.variant.tag, c.variant.quant.name, c.variant.resident, c.variant.vram_bytes,
                             c.speed.decode_tps, self.breaker.is_open(c.variant.tag, now))
                for family in catalog.families for c in self._family_table(catalog, family)]
