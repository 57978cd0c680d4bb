"""Ollama's scheduler on one GPU, and the router in front of it, as a discrete-event simulation.

What is simulated (docs/ollama.md §3 unless noted), with the `EngineSpec` dimensions in brackets:
- one runner per loaded variant serving up to [`OLLAMA_NUM_PARALLEL`] requests at once in one batch (each
  at 1/b^β of its solo speed, bench/sim/hardware.py), the rest queued; at most 3 runners per GPU
  (`defaultModelsPerGPU`), keep_alive 5 min;
- a load evicts idle runners first when the prediction (weights + f16 KV for num_ctx × parallel, whatever
  the [KV cache type]) exceeds [80 %] of free memory and something else is loaded, otherwise waits for a
  runner to go idle; the first model always loads, with layers that do not fit left on the CPU; the runner
  then really holds the weights, its KV cache at the real element size and the compute graph;
- [load times] with jitter; decode speed on [a curve] that is not the router's prior;
- runners on one GPU time-slice it (CUDA contexts of different processes do not overlap without MPS), so
  k busy runners each progress at 1/k of their solo speed (an assumption, stated in the results);
- other tenants take memory as it frees up, never more than is there;
- each request's deadline cancels it wherever it is, as a gRPC deadline cancels the Ollama request.

The router sees what production sees: NVML free memory, `/api/ps` residency, its own in-flight requests (with
their deadlines and rate floors, which callers sent it), its recent routings and a `ThroughputTable` fed with
Ollama's per-request figures. Truth reaches only policies that ask `view.truth`.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bench.sim.hardware import (
    BATCH_SLOWDOWN_EXPONENT,
    DEFAULT_ENGINE,
    OLLAMA_MINIMUM_MEMORY,
    EngineSpec,
    FamilySpec,
    GpuSpec,
    VariantSpec,
    load_seconds,
    ollama_predicted_bytes,
    prompt_tps,
    resident_bytes,
    seconds_per_token,
)
from bench.sim.workload import Request, meets_floor
from quantrouter.policy import LOAD_WINDOW_S
from quantrouter.throughput import Observation, ThroughputSnapshot, ThroughputTable, bandwidth_for
from quantrouter.units import NS

# Ollama defaults (docs/ollama.md §3): keep_alive 5 min, 3 models per GPU.
KEEP_ALIVE_S = 300.0
MAX_LOADED_MODELS = 3
# The router's EWMA weight (quantrouter.config default ewma_alpha).
EWMA_ALPHA = 0.3
# One num_ctx per variant so Ollama never reloads over a context change (docs/ollama.md §3, "Router rule").
NUM_CTX = 8192


class Outcome(enum.Enum):
    COMPLETED = "completed"
    REJECTED = "rejected"
    DEADLINE = "deadline"


@dataclass(frozen=True, slots=True)
class Choice:
    """A policy's pick; `service_seconds` is its own estimate of the request's time, which a router keeps to
    know its backlog (0 for policies that do not estimate)."""

    tag: str | None
    reason: str
    service_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Prediction:
    """The truth about serving a request on a variant now, assuming no further arrivals."""

    finish: float
    decode_tps: float


class Truth(Protocol):
    def predict(self, request: Request, tag: str) -> Prediction: ...


@dataclass(frozen=True, slots=True)
class RouterView:
    """What a routing policy may read at a decision; `truth` is for the oracle and truth-fed variants only."""

    now: float
    family: FamilySpec
    gpu_name: str
    capacity_bytes: int
    free_bytes: int
    resident: Mapping[str, int]
    in_flight: Mapping[str, int]
    speeds: ThroughputSnapshot
    num_ctx: int
    truth: Truth
    backlog: tuple[tuple[str, float, float], ...] = ()  # (tag, service estimate, share streamed) per request
    slos: tuple[tuple[float, float], ...] = ()  # (seconds to its deadline, min tok/s) per request, as `backlog`
    arrivals: tuple[tuple[float, float], ...] = ()  # (time, service estimate) of the last LOAD_WINDOW_S's routings


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    def choose(self, request: Request, view: RouterView) -> Choice: ...


@dataclass(frozen=True, slots=True)
class RequestResult:
    request: Request
    outcome: Outcome
    reason: str
    tag: str | None = None
    quality: float = 0.0
    latency: float = math.nan
    ttft: float = math.nan
    decode_tps: float = 0.0
    cold: bool = False
    floor_met: bool = True  # False when the variant is below the request's min_quantization

    @property
    def slo_met(self) -> bool:
        return (self.outcome is Outcome.COMPLETED and self.floor_met
                and self.decode_tps >= self.request.min_tokens_per_second)


@dataclass(frozen=True, slots=True)
class MemorySample:
    time: float
    tenant_bytes: int
    runner_bytes: int


@dataclass(frozen=True, slots=True)
class RunResult:
    results: tuple[RequestResult, ...]
    loads: int
    evicting_loads: int
    partial_loads: int
    memory: tuple[MemorySample, ...]
    capacity_bytes: int
    audits: tuple[dict[str, float], ...] = ()


@dataclass(slots=True, eq=False)
class _Job:
    """A request inside Ollama: mutable run state (identity equality, so removal finds this very job)."""

    request: Request
    variant: VariantSpec
    cold: bool
    prefill_work: float
    service_estimate: float = 0.0
    decode_work: float = 0.0
    phase: str = "queued"  # queued → prefill → decode
    work_left: float = 0.0
    acquired: float = math.nan
    phase_start: float = 0.0
    prefill_wall: float = 0.0
    peak_runners: int = 1  # what the router notes at each dispatch (quantrouter.router `_note_sharing`)

    def tokens_done(self) -> float:
        """The share of its tokens the router has seen stream back."""
        if self.phase != "decode" or self.decode_work <= 0:
            return 0.0
        return 1.0 - self.work_left / self.decode_work

    def remaining_work(self) -> float:
        if self.phase == "queued":
            return self.prefill_work + self.decode_work
        return self.work_left + (self.decode_work if self.phase == "prefill" else 0.0)


@dataclass(slots=True)
class _Runner:
    """A loaded (or loading) variant: mutable run state; the head of `jobs` is the one running."""

    variant: VariantSpec
    gpu_bytes: int
    gpu_fraction: float
    ready_at: float
    jobs: deque[_Job] = field(default_factory=deque)
    generation: int = 0

    def ready(self, now: float) -> bool:
        return self.ready_at <= now

    def busy(self, now: float) -> bool:
        return self.ready(now) and bool(self.jobs)

    def active(self) -> list[_Job]:
        return [j for j in self.jobs if j.phase != "queued"]


class Simulation:
    """One trace on one GPU under one policy. `run()` returns every request's outcome and the load counters."""

    def __init__(self, gpu: GpuSpec, family: FamilySpec, requests: Sequence[Request],
                 tenant: Sequence[tuple[float, int]], policy: Policy, audit: Sequence[Policy] = (),
                 value: Callable[[Request, Prediction, float], float] | None = None,
                 engine: EngineSpec = DEFAULT_ENGINE, num_ctx: int = NUM_CTX) -> None:
        self.gpu, self.family, self.policy = gpu, family, policy
        self.engine, self.num_ctx = engine, num_ctx
        self._audit, self._value = audit, value
        self.now = 0.0
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._runners: dict[str, _Runner] = {}
        self._pending: deque[_Job] = deque()
        self._jobs: dict[int, _Job] = {}
        self._tenant_want = 0
        self._table = ThroughputTable(EWMA_ALPHA, bandwidth_for([gpu.nvml_name]))
        self._in_flight: Counter[str] = Counter()
        self._arrivals: deque[tuple[float, float]] = deque()
        self._results: list[RequestResult] = []
        self._loads = self._evicting_loads = self._partial_loads = 0
        self._memory: list[MemorySample] = []
        self._audits: list[dict[str, float]] = []
        for r in requests:
            self.submit(r)
        for t, want in tenant:
            self._push(t, "tenant", want)

    # ---- memory -------------------------------------------------------------------------------------------
    def _runner_bytes(self) -> int:
        return sum(r.gpu_bytes for r in self._runners.values())

    def _tenant_bytes(self) -> int:
        """Other tenants take what they want of what our runners leave."""
        return min(self._tenant_want, self.gpu.capacity_bytes - self._runner_bytes())

    def free_bytes(self) -> int:
        return self.gpu.capacity_bytes - self._tenant_bytes() - self._runner_bytes()

    def _sample_memory(self) -> None:
        """Record memory when it changed (the plots and the capacity test read these)."""
        runner = self._runner_bytes()
        tenant = min(self._tenant_want, self.gpu.capacity_bytes - runner)
        last = self._memory[-1] if self._memory else None
        if last is None or (last.tenant_bytes, last.runner_bytes) != (tenant, runner):
            self._memory.append(MemorySample(self.now, tenant, runner))

    # ---- truth (oracle only) -------------------------------------------------------------------------------
    def _seconds_per_token(self, v: VariantSpec, context: float, fraction: float) -> float:
        return seconds_per_token(self.gpu, self.family, v, context, fraction, self.engine)

    def predict(self, request: Request, tag: str) -> Prediction:
        v = self.family.variant(tag)
        busy = {t for t, r in self._runners.items() if r.busy(self.now)}
        share = len(busy | {tag})
        runner = self._runners.get(tag)
        parallel = self.engine.num_parallel
        batch = 1
        if runner is not None:
            fraction = runner.gpu_fraction
            batch = min(len(runner.jobs) + 1, parallel)
            queued = sum(j.remaining_work() for j in runner.jobs) if len(runner.jobs) >= parallel else 0.0
            wait = max(runner.ready_at - self.now, 0.0) + queued * share / parallel ** (1 - BATCH_SLOWDOWN_EXPONENT)
        else:
            fraction, wait = self._placement(v, share)
            wait += load_seconds(self.gpu, v) * math.exp(self.engine.load_jitter * request.load_noise)
        slowdown = share * batch ** BATCH_SLOWDOWN_EXPONENT
        context = request.prompt_tokens + request.output_tokens / 2
        decode = request.output_tokens * self._seconds_per_token(v, context, fraction) / request.speed_noise
        prefill = request.prompt_tokens / prompt_tps(self.gpu, self.family)
        return Prediction(self.now + wait + (prefill + decode) * slowdown, request.output_tokens / (decode * slowdown))

    def _placement(self, v: VariantSpec, share: int) -> tuple[float, float]:
        """(GPU fraction, seconds to wait for memory) if `v` were loaded now, by Ollama's rule."""
        need = ollama_predicted_bytes(self.family, v, self.num_ctx, self.engine)
        actual = resident_bytes(self.family, v, self.num_ctx, self.engine)
        idle = sum(r.gpu_bytes for r in self._runners.values() if r.ready(self.now) and not r.jobs)
        held = self._runner_bytes()
        room = self.gpu.capacity_bytes - self._tenant_bytes() - OLLAMA_MINIMUM_MEMORY
        fraction = min(1.0, max(room, 0) / actual)
        threshold = self.engine.load_fraction
        if not self._runners or need <= threshold * (self.free_bytes() + idle):
            return min(1.0, max(self.free_bytes() + idle - OLLAMA_MINIMUM_MEMORY, 0) / actual), 0.0
        drain = max((sum(j.remaining_work() for j in r.jobs) for r in self._runners.values()), default=0.0)
        return (fraction if need > threshold * (self.free_bytes() + held) else 1.0), drain * share

    # ---- events ---------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def _rates(self) -> list[tuple[_Job, float]]:
        """Each running job with its progress per second: the GPU time-sliced across busy runners, and within a
        runner shared by the batch."""
        batches = [r.active() for r in self._runners.values() if r.ready(self.now)]
        batches = [b for b in batches if b]
        return [(job, 1.0 / (len(batches) * len(batch) ** BATCH_SLOWDOWN_EXPONENT))
                for batch in batches for job in batch]

    def _advance(self, t: float, rates: list[tuple[_Job, float]]) -> None:
        if t > self.now:
            for job, rate in rates:
                job.work_left -= (t - self.now) * rate
        self.now = t

    def run(self) -> RunResult:
        self.run_until(math.inf)
        return self.result()

    def run_until(self, limit: float) -> None:
        """Play every event up to `limit` and stop there (a fleet steps its nodes together this way)."""
        while True:
            rates = self._rates()
            if not self._events and not rates:
                break
            next_event = self._events[0][0] if self._events else math.inf
            soonest = min(rates, key=lambda jr: jr[0].work_left / jr[1], default=None)
            phase_end = self.now + soonest[0].work_left / soonest[1] if soonest else math.inf
            if min(phase_end, next_event) > limit:
                self._advance(max(limit, self.now), rates)
                return
            if soonest is not None and phase_end <= next_event:
                self._advance(phase_end, rates)
                soonest[0].work_left = 0.0
                self._end_phase(soonest[0])
            else:
                t, _, kind, payload = heapq.heappop(self._events)
                self._advance(t, rates)
                self._handle(kind, payload)
            self._sample_memory()

    def submit(self, request: Request) -> None:
        """Add a request while the simulation runs (a fleet routes it here on its arrival)."""
        self._push(request.arrival, "arrival", request)
        self._push(request.arrival + request.deadline_s, "deadline", request)

    def view(self) -> RouterView:
        """The node as its router sees it now (what a node reports to a fleet)."""
        return self._view()

    def result(self) -> RunResult:
        return RunResult(tuple(sorted(self._results, key=lambda r: r.request.id)), self._loads,
                         self._evicting_loads, self._partial_loads, tuple(self._memory), self.gpu.capacity_bytes,
                         tuple(self._audits))

    def _handle(self, kind: str, payload: object) -> None:
        if kind == "arrival":
            assert isinstance(payload, Request)
            self._arrive(payload)
        elif kind == "deadline":
            assert isinstance(payload, Request)
            self._cancel(payload)
        elif kind == "tenant":
            assert isinstance(payload, int)
            self._tenant_want = payload
            self._schedule()
        elif kind == "loaded":
            assert isinstance(payload, _Runner)
            for job in payload.jobs:
                job.acquired = self.now
            self._start_next(payload)
        elif kind == "expire":
            assert isinstance(payload, tuple)
            tag, generation = payload
            runner = self._runners.get(tag)
            if runner is not None and runner.generation == generation and not runner.jobs:
                del self._runners[tag]
                self._schedule()

    # ---- the router -------------------------------------------------------------------------------------------
    def _view(self) -> RouterView:
        resident = {t: r.gpu_bytes for t, r in self._runners.items() if r.ready(self.now)}
        backlog = tuple((j.variant.tag, j.service_estimate, j.tokens_done()) for j in self._jobs.values())
        slos = tuple((j.request.arrival + j.request.deadline_s - self.now, j.request.min_tokens_per_second)
                     for j in self._jobs.values())
        return RouterView(self.now, self.family, self.gpu.nvml_name, self.gpu.capacity_bytes, self.free_bytes(),
                          resident, dict(self._in_flight), self._table.snapshot(), self.num_ctx, self, backlog,
                          slos, tuple(self._arrivals))

    def _arrive(self, request: Request) -> None:
        while self._arrivals and self._arrivals[0][0] < self.now - LOAD_WINDOW_S:
            self._arrivals.popleft()
        view = self._view()
        choice = self.policy.choose(request, view)
        if self._audit and self._value is not None:
            self._audits.append(self._audit_values(request, view, choice))
        self._arrivals.append((self.now, choice.service_seconds))
        if choice.tag is None:
            self._results.append(RequestResult(request, Outcome.REJECTED, choice.reason))
            return
        v = self.family.variant(choice.tag)
        job = _Job(request, v, v.tag not in view.resident, request.prompt_tokens / prompt_tps(self.gpu, self.family),
                   choice.service_seconds)
        self._jobs[request.id] = job
        self._in_flight[v.tag] += 1
        self._note_sharing()
        runner = self._runners.get(v.tag)
        if runner is not None:
            self._assign(job, runner)
        else:
            self._pending.append(job)
            self._schedule()

    def _note_sharing(self) -> None:
        """As the router does at each dispatch: every in-flight request notes the most runners busy (its speed
        sample then says whether it ran alone)."""
        busy = sum(1 for count in self._in_flight.values() if count)
        for job in self._jobs.values():
            job.peak_runners = max(job.peak_runners, busy)

    def _audit_values(self, request: Request, view: RouterView, choice: Choice) -> dict[str, float]:
        assert self._value is not None
        values = {}
        for policy in (self.policy, *self._audit):
            tag = choice.tag if policy is self.policy else policy.choose(request, view).tag
            quality = self.family.quality(tag) if tag else 0.0
            values[policy.name] = self._value(request, self.predict(request, tag), quality) if tag else 0.0
        return values

    def _finish(self, job: _Job, runner: _Runner) -> None:
        request, latency = job.request, self.now - job.request.arrival
        decode_wall = self.now - job.phase_start
        self._in_flight[job.variant.tag] -= 1
        del self._jobs[request.id]
        load_wait = job.acquired - request.arrival
        self._table.observe(job.variant.tag, Observation(
            request.output_tokens, int(decode_wall * NS), request.prompt_tokens, int(job.prefill_wall * NS),
            int(load_wait * NS), job.cold, job.peak_runners))
        self._results.append(RequestResult(
            request, Outcome.COMPLETED, "completed", job.variant.tag, self.family.quality(job.variant.tag), latency,
            job.phase_start - request.arrival, request.output_tokens / decode_wall, job.cold,
            floor_met=meets_floor(request, job.variant.quant)))
        runner.jobs.remove(job)
        self._start_next(runner)

    def _cancel(self, request: Request) -> None:
        job = self._jobs.pop(request.id, None)
        if job is None:
            return
        self._in_flight[job.variant.tag] -= 1
        self._results.append(RequestResult(request, Outcome.DEADLINE, f"deadline passed while {job.phase}",
                                           job.variant.tag, self.family.quality(job.variant.tag), cold=job.cold))
        if job in self._pending:
            self._pending.remove(job)
            self._schedule()
            return
        runner = self._runners[job.variant.tag]
        runner.jobs.remove(job)
        self._start_next(runner)

    # ---- Ollama's scheduler --------------------------------------------------------------------------------------
    def _assign(self, job: _Job, runner: _Runner) -> None:
        """Queue `job` on `runner`; its decode cost depends on how much of the runner sits on the GPU."""
        request = job.request
        context = request.prompt_tokens + request.output_tokens / 2
        seconds = self._seconds_per_token(job.variant, context, runner.gpu_fraction)
        job.decode_work = request.output_tokens * seconds / request.speed_noise
        if runner.ready(self.now):
            job.acquired = self.now
        runner.jobs.append(job)
        self._start_next(runner)

    def _end_phase(self, job: _Job) -> None:
        if job.phase == "prefill":
            job.prefill_wall = self.now - job.phase_start
            job.phase, job.work_left, job.phase_start = "decode", job.decode_work, self.now
            return
        self._finish(job, self._runners[job.variant.tag])

    def _start_next(self, runner: _Runner) -> None:
        if not runner.ready(self.now):
            return
        if runner.jobs:
            for job in itertools.islice(runner.jobs, self.engine.num_parallel):
                if job.phase == "queued":
                    job.phase, job.work_left, job.phase_start = "prefill", job.prefill_work, self.now
            return
        runner.generation += 1
        self._push(self.now + KEEP_ALIVE_S, "expire", (runner.variant.tag, runner.generation))
        self._schedule()

    def _schedule(self) -> None:
        """Serve the pending queue in order; the head waits (and blocks the rest) until it can load."""
        while self._pending:
            job = self._pending[0]
            runner = self._runners.get(job.variant.tag) or self._load(job.variant, job.request)
            if runner is None:
                return
            self._pending.popleft()
            self._assign(job, runner)

    def _load(self, v: VariantSpec, trigger: Request) -> _Runner | None:
        need = ollama_predicted_bytes(self.family, v, self.num_ctx, self.engine)
        evicted = False
        while self._runners and (need > self.engine.load_fraction * self.free_bytes()
                                 or len(self._runners) >= MAX_LOADED_MODELS):
            idle = sorted(t for t, r in self._runners.items() if r.ready(self.now) and not r.jobs)
            if not idle:
                return None
            del self._runners[idle[0]]
            evicted = True
        actual = resident_bytes(self.family, v, self.num_ctx, self.engine)
        room = max(self.free_bytes() - (OLLAMA_MINIMUM_MEMORY if not self._runners else 0), 0)
        gpu_bytes = min(actual, room)
        load = load_seconds(self.gpu, v) * math.exp(self.engine.load_jitter * trigger.load_noise)
        runner = _Runner(v, gpu_bytes, gpu_bytes / actual, self.now + load)
        self._runners[v.tag] = runner
        self._loads += 1
        self._evicting_loads += evicted
        self._partial_loads += gpu_bytes < actual
        self._push(runner.ready_at, "loaded", runner)
        return runner
