"""The routing policies compared on the same traces: quantrouter's real `decide`, the usual rules, an oracle."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from weakref import WeakKeyDictionary

from bench.sim.engine import NUM_CTX, Choice, Policy, Prediction, RouterView, RunResult, Simulation, Truth
from bench.sim.hardware import (
    DEFAULT_ENGINE,
    OLLAMA_MINIMUM_MEMORY,
    EngineSpec,
    FamilySpec,
    GpuSpec,
    VariantSpec,
    ollama_predicted_bytes,
)
from bench.sim.workload import Request, meets_floor
from quantrouter.catalog import VariantInfo
from quantrouter.loads import LoadsStarted
from quantrouter.policy import (
    SURGE_WINDOW_S,
    CandidateInput,
    InFlight,
    MemoryView,
    PolicyConfig,
    RoutingRequest,
    decide,
    offered_load,
    queued_by_variant,
    remaining,
    runners_tolerated,
)
from quantrouter.quant import KV_CACHE_TYPES, QuantType, parse_quantization, quality_order
from quantrouter.router import SloWindow
from quantrouter.values import Preference

# "Highest quant whose size × 1.2 fits total VRAM": the common rule of thumb (20 % for KV cache and overhead).
STATIC_RULE_HEADROOM = 1.2
DEFAULT_QUANT = "Q4_K_M"  # Ollama's library default tag for most families


def remaining_by_stream(view: RouterView) -> tuple[tuple[str, float], ...]:
    """Each in-flight request's variant and expected remaining seconds, as the router keeps them
    (`policy.remaining`: no more than the time left before its deadline)."""
    return tuple((tag, remaining(service, done, left))
                 for (tag, service, done), (left, _) in zip(view.backlog, view.slos, strict=True))


def streams_of(view: RouterView, tokens_per_second: Mapping[str, float]) -> tuple[InFlight, ...]:
    """Each in-flight request with its SLO and its variant's decode rate, as the router keeps them."""
    return tuple(InFlight(service, done, tokens_per_second[tag], left, floor)
                 for (tag, service, done), (left, floor) in zip(view.backlog, view.slos, strict=True))


@dataclass(frozen=True, slots=True)
class QuantRouter:
    """quantrouter's `decide`, fed as the service feeds it: estimates from the throughput table, the backlog
    from its own in-flight requests (their estimates, the share of tokens streamed and their SLOs), the
    offered load from its recent routings, and the loads it started that the engine does not yet list resident
    (the router's `LoadsStarted`, one per simulation it routes for, keyed by `view.truth` as an identity only:
    nothing of it is read), and the rate of its recent routings that carried a deadline or a rate floor, by the
    runners time-slicing the GPU each one's SLO bears (the router's `SloWindow`, kept the same way, only while the
    arrivals charge is on). `min_quantization` is a floor on every request, on top of the request's own."""

    name: str = "quantrouter"
    config: PolicyConfig = field(default_factory=PolicyConfig)
    min_quantization: QuantType | None = None
    loads: WeakKeyDictionary[Truth, LoadsStarted] = field(default_factory=WeakKeyDictionary, compare=False,
                                                          repr=False)
    tight: WeakKeyDictionary[Truth, SloWindow] = field(default_factory=WeakKeyDictionary, compare=False,
                                                        repr=False)

    def choose(self, request: Request, view: RouterView) -> Choice:
        family = view.family
        loads = self.loads.setdefault(view.truth, LoadsStarted())
        tight = self.tight.setdefault(view.truth, SloWindow())
        loading = loads.loading(view.now, view.resident.__contains__)
        infos = [VariantInfo(v.tag, family.name, v.quant, v.size_bytes, family.parameter_count, family.architecture,
                             v.tag in view.resident, view.resident.get(v.tag, 0)) for v in family.variants]
        speeds = view.speeds.estimates(infos)
        streams = remaining_by_stream(view)
        queued = queued_by_variant(streams)
        candidates = [CandidateInput(info, speed, info.quant.quality, view.in_flight.get(info.tag, 0),
                                     queued_seconds=queued.get(info.tag, 0.0), loading=info.tag in loading)
                      for info, speed in speeds]
        floor = parse_quantization(request.min_quantization) if request.min_quantization else self.min_quantization
        routing = RoutingRequest(family.name, request.preference, prompt_tokens=request.prompt_tokens,
                                 num_predict=request.output_tokens, num_ctx=view.num_ctx, min_quantization=floor,
                                 min_tokens_per_second=request.min_tokens_per_second,
                                 time_remaining=request.deadline_s)
        backlog = tuple(sorted(left for _, left in streams))
        in_flight = streams_of(view, {info.tag: speed.decode_tps for info, speed in speeds})
        memory = MemoryView(view.free_bytes, OLLAMA_MINIMUM_MEMORY, "nvml", backlog, in_flight,
                            offered_load(view.arrivals, view.now), shared=True,
                            tight_rates=tight.per_second(view.now) if self.config.tight_arrivals else (),
                            surge_load=offered_load(view.arrivals, view.now, SURGE_WINDOW_S)
                            if self.config.surge_factor else 0.0)
        decision = decide(routing, candidates, memory, self.config)
        chosen = decision.chosen
        if chosen is None:
            return Choice(None, decision.reason_code)
        if self.config.tight_arrivals and (math.isfinite(request.deadline_s) or request.min_tokens_per_second):
            tight.add(view.now, runners_tolerated(chosen, routing.time_remaining, routing.min_tokens_per_second))
        if not chosen.resident:
            loads.started(chosen.tag, view.now, chosen.time_to_first_token)
        return Choice(chosen.tag, decision.reason_code, chosen.expected_seconds - chosen.queue_seconds)


@dataclass(frozen=True, slots=True)
class AlwaysQuant:
    quant: str = DEFAULT_QUANT
    name: str = "always-q4_K_M"

    def choose(self, request: Request, view: RouterView) -> Choice:
        return Choice(next(v.tag for v in view.family.variants if v.quant.name == self.quant), "fixed")


def static_rule_pick(family: FamilySpec, capacity_bytes: int) -> VariantSpec:
    """Highest quality whose file size × 1.2 fits the GPU's total memory (the smallest when none does)."""
    fitting = [v for v in family.variants if v.size_bytes * STATIC_RULE_HEADROOM <= capacity_bytes]
    pool = fitting or [min(family.variants, key=lambda v: v.size_bytes)]
    best = quality_order([v.quant for v in pool])[0]
    return next(v for v in pool if v.quant is best)


@dataclass(frozen=True, slots=True)
class StaticVramRule:
    """The rule of thumb, decided once per GPU."""

    name: str = "static-1.2x-vram"

    def choose(self, request: Request, view: RouterView) -> Choice:
        return Choice(static_rule_pick(view.family, view.capacity_bytes).tag, "static")


@dataclass(frozen=True, slots=True)
class LargestFitsFree:
    """The largest variant that is resident or fits NVML free memory now (smallest when none does)."""

    name: str = "largest-fits-free"

    def choose(self, request: Request, view: RouterView) -> Choice:
        room = view.free_bytes - OLLAMA_MINIMUM_MEMORY
        fitting = [v for v in view.family.variants
                   if v.tag in view.resident or ollama_predicted_bytes(view.family, v, view.num_ctx) <= room]
        pick = max(fitting, key=lambda v: v.size_bytes) if fitting else min(view.family.variants,
                                                                          key=lambda v: v.size_bytes)
        return Choice(pick.tag, "largest")


@dataclass(frozen=True, slots=True)
class LatencyOnly:
    """The variant with the highest decode tok/s the router has measured (its prior before any sample)."""

    name: str = "latency-only"

    def choose(self, request: Request, view: RouterView) -> Choice:
        family = view.family
        infos = [VariantInfo(v.tag, family.name, v.quant, v.size_bytes) for v in family.variants]
        pick = max(view.speeds.estimates(infos), key=lambda pair: pair[1].decode_tps)[0]
        return Choice(pick.tag, "fastest")


def slo_value(request: Request, prediction: Prediction, quality: float) -> float:
    """The oracle's objective for one request: quality-weighted tokens if the SLO is met, else nothing."""
    on_time = prediction.finish - request.arrival <= request.deadline_s
    fast_enough = prediction.decode_tps >= request.min_tokens_per_second
    return quality * request.output_tokens if on_time and fast_enough else 0.0


@dataclass(frozen=True, slots=True)
class Oracle:
    """Knows the true speeds, output lengths, load times and queues now (not future arrivals).

    Picks the variant that maximises `slo_value`; ties go to the earlier finish. Rejects when none meets the SLO.
    """

    name: str = "oracle-per-request"

    def choose(self, request: Request, view: RouterView) -> Choice:
        def key(v: VariantSpec) -> tuple[float, float]:
            if not meets_floor(request, v.quant):
                return 0.0, -math.inf
            prediction = view.truth.predict(request, v.tag)
            return slo_value(request, prediction, view.family.quality(v.tag)), -prediction.finish

        best = max(view.family.variants, key=key)
        if key(best)[0] <= 0:
            return Choice(None, "no variant meets the SLO")
        return Choice(best.tag, "oracle")


@dataclass(frozen=True, slots=True)
class FixedPerPreference:
    """One variant per preference, whatever the state: what the hindsight search tries."""

    mapping: tuple[tuple[Preference, str], ...]
    name: str = "oracle-hindsight"

    def choose(self, request: Request, view: RouterView) -> Choice:
        return Choice(dict(self.mapping)[request.preference], "fixed per preference")


@dataclass(frozen=True, slots=True)
class Assignment:
    """A variant (or a refusal) for each request id: what the exhaustive search enumerates."""

    tags: tuple[str | None, ...]
    name: str = "assignment"

    def choose(self, request: Request, view: RouterView) -> Choice:
        return Choice(self.tags[request.id], "assigned")


# Coordinate-descent passes over (preference, variant) in the hindsight search.
HINDSIGHT_PASSES = 1


def goodput(run: RunResult) -> float:
    """Quality-weighted tokens of the requests that met their SLO (per trace; divide by its duration for a rate)."""
    return sum(r.quality * r.request.output_tokens for r in run.results if r.slo_met)


def exhaustive_best(gpu: GpuSpec, family: FamilySpec, requests: Sequence[Request],
                    tenant: Sequence[tuple[float, int]], engine: EngineSpec = DEFAULT_ENGINE) -> float:
    """The highest goodput any policy can reach on a tiny trace: every assignment of a variant or a refusal to
    every request, each replayed on the simulator ((variants + 1)^requests runs)."""
    options: list[str | None] = [v.tag for v in family.variants] + [None]
    return max(goodput(Simulation(gpu, family, requests, tenant, Assignment(tags), engine=engine).run())
               for tags in itertools.product(options, repeat=len(requests)))


def hindsight_best(gpu: GpuSpec, family: FamilySpec, requests: Sequence[Request],
                   tenant: Sequence[tuple[float, int]], engine: EngineSpec = DEFAULT_ENGINE,
                   num_ctx: int = NUM_CTX) -> RunResult:
    """The best fixed variant per preference for this very trace, found by replaying it (coordinate descent
    from always-Q4_K_M, one pass over every preference × variant)."""
    def run(mapping: dict[Preference, str]) -> RunResult:
        policy = FixedPerPreference(tuple(mapping.items()))
        return Simulation(gpu, family, requests, tenant, policy, engine=engine, num_ctx=num_ctx).run()

    starts = [next(v.tag for v in family.variants if v.quant.name == DEFAULT_QUANT)]
    best_mapping: dict[Preference, str] = {}
    best: RunResult | None = None
    for tag in starts:
        mapping = dict.fromkeys(Preference, tag)
        result = run(mapping)
        if best is None or goodput(result) > goodput(best):
            best_mapping, best = mapping, result
    assert best is not None
    for _ in range(HINDSIGHT_PASSES):
        for preference in Preference:
            for v in family.variants:
                trial = {**best_mapping, preference: v.tag}
                result = run(trial)
                if goodput(result) > goodput(best):
                    best_mapping, best = trial, result
    return best


BASELINES = (AlwaysQuant(), StaticVramRule(), LargestFitsFree(), LatencyOnly())
POLICIES = (QuantRouter(), *BASELINES, Oracle())


def policies_for(engine: EngineSpec, base: PolicyConfig | None = None) -> tuple[Policy, ...]:
    """`POLICIES` with quantrouter set up as its operator would beside this engine: `base`'s knobs (the defaults
    when None), told Ollama's OLLAMA_NUM_PARALLEL and OLLAMA_KV_CACHE_TYPE (settings ollama_num_parallel,
    ollama_kv_cache_type). What those mean for memory and speed stays the simulator's own (bench/sim/hardware.py)."""
    config = replace(base or PolicyConfig(), runner_parallel=engine.num_parallel,
                     kv_bytes_per_element=KV_CACHE_TYPES[engine.kv_cache])
    return (QuantRouter(config=config), *POLICIES[1:])
