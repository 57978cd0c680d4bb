"""The routing decision: a pure function from plain values to an explainable `Decision`.

No I/O, no clock, no logging: the service passes in the catalog's variants, a memory view, the speed
estimates and the time left before the deadline. The model (design §5):

- memory needed = weights + f16 KV cache for num_ctx; a variant fits when it is resident, or when
  need ≤ `load_fraction` × (free − reserve + what idle variants of the same family would give back on
  eviction): Ollama loads a model beside others only within 80 % of free memory and otherwise waits for
  busy runners to finish (reference/ollama.md §3), which a routed request would spend in a queue;
- queue = the GPU's backlog as this request would meet it: runners of one GPU time-slice it, so each
  in-flight request delays this one by min(its remaining seconds, this one's own service time), and on a
  runner that already serves `runner_parallel` requests this one also waits its turn;
- ttft = queue + cold-load time (when not resident) + prompt tokens / prompt tok/s;
- expected time T = ttft + num_predict / decode tok/s;
- churn = when loading a variant must evict an idle resident sibling (it does not fit beside it), the
  sibling's reload time, which its next users pay; ranked on (never counted against the deadline);
- quality = the candidate's quality (measured agreement where calibrated, else the quant prior);
  qualities within `quality_tolerance` of the best count as equal, so QUALITY takes the faster of equals.

QUALITY takes the highest quality (ties: smaller T + churn); LATENCY the smallest T + churn (ties:
higher quality); BALANCED maximises w·q/q_max + (1−w)·C_min/C with C = T + churn, w =
`balanced_quality_weight`. Constraints and the deadline reject first. A variant below
`SPEED_FLOOR_BPW` whose speed is still a prior is held back while a variant at or above the floor can
serve: below ~4.5 bits/weight dequantisation eats the smaller read (reference/quant.md §2 (iii)), so
such a variant only wins when memory or an explicit constraint demands it. When memory pressure rejects
the variant the preference would have taken, the decision says `downgraded`. To keep Ollama from
loading and unloading in a thrash, a non-resident variant replaces a resident sibling only when it fits
with a margin (`upgrade_hysteresis`) to spare.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate

from quantrouter.catalog import VariantInfo
from quantrouter.quant import QuantType
from quantrouter.throughput import SPEED_FLOOR_BPW, SpeedEstimate
from quantrouter.units import format_bytes
from quantrouter.values import Assessment, Decision, FailureKind, Preference

__all__ = [
    "CandidateInput",
    "MemoryView",
    "PolicyConfig",
    "RoutingRequest",
    "decide",
    "remaining_seconds",
]

# Ties within this relative margin count as equal, so the secondary key decides.
TIE_TOLERANCE = 1e-6
# Scores live in [0, 1]: a candidate at risk drops below every candidate that is not.
AT_RISK_PENALTY = 1.0
# How a deadline rejection starts, so that a decision can tell "the deadline alone" from other constraints.
DEADLINE_REJECTION = "expected"
# When the architecture is unknown (no /api/show yet), assume the KV cache adds this share of the weights.
UNKNOWN_KV_SHARE = 0.1
# Ollama's scheduler loads beside other models only when the prediction ≤ 80 % of free memory
# (`server/sched.go` "Use 80% of free memory as threshold", reference/ollama.md §3).
OLLAMA_LOAD_FRACTION = 0.8


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    family: str
    preference: Preference = Preference.BALANCED
    pinned_tag: str | None = None
    prompt_tokens: int = 0
    num_predict: int = 256
    num_ctx: int = 4096
    min_quantization: QuantType | None = None
    allowed_quantizations: frozenset[str] = frozenset()
    min_tokens_per_second: float = 0.0
    max_time_to_first_token: float | None = None
    time_remaining: float | None = None
    excluded: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CandidateInput:
    """A variant with what the router knows of it right now."""

    variant: VariantInfo
    speed: SpeedEstimate
    quality: float
    in_flight: int = 0
    breaker_open: bool = False
    queued_seconds: float = 0.0  # expected remaining seconds of the requests this variant is serving


@dataclass(frozen=True, slots=True)
class MemoryView:
    """The GPU as the router sees it: free memory and the backlog of its own in-flight requests.

    `backlog` holds each in-flight request's expected remaining seconds, sorted ascending
    (`remaining_seconds` builds it).
    """

    free_bytes: int
    reserve_bytes: int = 0
    source: str = "static"
    backlog: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The policy's knobs.

    `quality_tolerance`: qualities this close to the best count as equal. 0.005 is about the standard
    error of a top-1 agreement measured on a few thousand tokens (√(0.9·0.1/4000) ≈ 0.005), and below the
    smallest gap between neighbouring rungs of the prior (Q4_K_M 0.919 vs IQ4_XS 0.913).
    `runner_parallel`: OLLAMA_NUM_PARALLEL of the backend, the requests one runner serves at once.
    `balanced_deadline_share`: for BALANCED requests with a deadline, an expected time within this share of
    the time left counts as fast enough, so quality decides among such candidates.
    """

    balanced_quality_weight: float = 0.5
    upgrade_hysteresis: float = 0.15
    load_fraction: float = OLLAMA_LOAD_FRACTION
    quality_tolerance: float = 0.005
    runner_parallel: int = 1
    balanced_deadline_share: float = 0.5


def remaining_seconds(expected_and_done: Sequence[tuple[float, float]]) -> tuple[float, ...]:
    """The backlog for `MemoryView`: each in-flight request's expected service time times the share of its
    tokens still to come (the tokens streamed so far tell; wall time does not, as queued and time-sliced
    requests make no progress while it passes)."""
    return tuple(sorted(expected * max(1.0 - done, 0.0) for expected, done in expected_and_done))


def _memory_needed(variant: VariantInfo, num_ctx: int) -> int:
    if variant.architecture is None:
        return int(variant.size_bytes * (1 + UNKNOWN_KV_SHARE))
    return variant.size_bytes + variant.architecture.kv_cache_bytes(num_ctx)


def _constraint_rejection(c: CandidateInput, request: RoutingRequest, speed: SpeedEstimate,
                          ttft: float, expected: float) -> str:
    quant = c.variant.quant
    floor = request.min_quantization
    if request.excluded and c.variant.tag in request.excluded:
        return "failed before its first token on this request"
    if c.breaker_open:
        return "skipped for a cool-down after repeated failures"
    if floor is not None and quant.quality < floor.quality:
        return f"below min_quantization {floor.name}"
    if request.allowed_quantizations and quant.name not in request.allowed_quantizations:
        return f"{quant.name} is not among the allowed quantizations"
    if request.min_tokens_per_second and speed.decode_tps < request.min_tokens_per_second:
        return f"{speed.decode_tps:.1f} tok/s is below min_tokens_per_second {request.min_tokens_per_second:g}"
    if request.max_time_to_first_token is not None and ttft > request.max_time_to_first_token:
        return f"time to first token {ttft:.2f} s exceeds max_time_to_first_token " \
               f"{request.max_time_to_first_token:.2f} s"
    if request.time_remaining is not None and expected > request.time_remaining:
        return (f"{DEADLINE_REJECTION} {expected:.2f} s exceeds the {request.time_remaining:.2f} s left "
                "before the deadline")
    return ""


class _Backlog:
    """Σ min(remaining_j, s) over the in-flight requests, in O(log n) per candidate."""

    __slots__ = ("_prefix", "_sorted")

    def __init__(self, remaining: tuple[float, ...]) -> None:
        self._sorted = remaining
        self._prefix = (0.0, *accumulate(remaining))

    def delay(self, service: float) -> float:
        i = bisect_left(self._sorted, service)
        return self._prefix[i] + service * (len(self._sorted) - i)


def _assess(c: CandidateInput, request: RoutingRequest, available: int, family_resident: bool,
            backlog: _Backlog, config: PolicyConfig) -> Assessment:
    v, speed = c.variant, c.speed
    need = _memory_needed(v, request.num_ctx)
    load = 0.0 if v.resident else speed.load_seconds
    prefill = request.prompt_tokens / speed.prompt_tps
    decode = request.num_predict / speed.decode_tps
    service = prefill + decode
    queue = backlog.delay(service)
    if c.in_flight >= config.runner_parallel:
        queue += max(c.queued_seconds - c.in_flight * service, 0.0)
    # Constraints judge the variant on its own (alone on the GPU); the backlog only steers (`at_risk`).
    rejection = _constraint_rejection(c, request, speed, load + prefill, load + service)
    memory_only = False
    usable = available * config.load_fraction
    if not rejection and not v.resident and request.pinned_tag is None:
        if need > usable:
            rejection = (f"needs {format_bytes(need)}, {format_bytes(max(available, 0))} free "
                         f"(Ollama loads within {config.load_fraction:.0%} of it)")
            memory_only = True
        elif family_resident and need > usable / (1 + config.upgrade_hysteresis):
            rejection = (f"needs {format_bytes(need)} of {format_bytes(available)} free: within the "
                         f"{config.upgrade_hysteresis:.0%} margin kept before replacing a resident sibling")
            memory_only = True
    ttft = queue + load + prefill
    expected = ttft + decode
    shared_tps = request.num_predict / (decode + queue) if queue and request.num_predict else speed.decode_tps
    at_risk = ((request.time_remaining is not None and expected > request.time_remaining)
               or shared_tps < request.min_tokens_per_second)
    return Assessment(v.tag, v.quant.name, need, v.resident, speed.decode_tps, speed.measured, ttft,
                      expected, c.quality, rejection=rejection, memory_only=memory_only, queue_seconds=queue,
                      at_risk=at_risk)


def _charge_churn(assessed: list[Assessment], pool: Sequence[CandidateInput], free: int,
                  config: PolicyConfig) -> None:
    """A load that only fits by evicting idle resident siblings costs their next users a reload."""
    idle = [c for c in pool if c.variant.resident and c.in_flight == 0]
    if not idle:
        return
    usable = free * config.load_fraction
    reload = sum(c.speed.load_seconds for c in idle)
    for i, a in enumerate(assessed):
        if a.feasible and not a.resident and a.memory_bytes > usable:
            assessed[i] = replace(a, churn_seconds=reload)


def _hold_back_sub_floor(assessed: list[Assessment], pool: Sequence[CandidateInput]) -> None:
    """Variants below the speed floor yield to any feasible variant at or above it that is (or is believed)
    at least as fast: they serve when memory or an explicit constraint leaves nothing else."""
    below = [c.variant.quant.bits_per_weight < SPEED_FLOOR_BPW for c in pool]
    fastest = max((a.tokens_per_second for a, b in zip(assessed, below, strict=True) if a.feasible and not b),
                  default=None)
    if fastest is None:
        return
    for i, a in enumerate(assessed):
        if below[i] and a.feasible and (not a.measured or a.tokens_per_second <= fastest):
            assessed[i] = replace(a, rejection=f"below {SPEED_FLOOR_BPW:g} bits/weight and no faster than a "
                                               "variant above it (dequantisation): kept for memory pressure")


def _rank(assessments: Sequence[Assessment], preference: Preference, config: PolicyConfig,
          time_remaining: float | None) -> list[Assessment]:
    """Best first, each with its score set (higher is better); candidates at risk of missing the deadline or
    the speed floor behind the GPU's backlog score `AT_RISK_PENALTY` lower, so they rank after the rest."""
    if not assessments:
        return []
    safe = [a for a in assessments if not a.at_risk]
    if not safe:  # nothing is expected to make it: the fastest has the best chance
        safe, preference = list(assessments), Preference.LATENCY
    top_q = max(a.quality for a in safe)
    floor_q = top_q - config.quality_tolerance
    best_q = top_q or 1.0
    # BALANCED with a deadline: finishing within `balanced_deadline_share` of the time left is fast enough.
    enough = (config.balanced_deadline_share * time_remaining
              if preference is Preference.BALANCED and time_remaining is not None else 0.0)

    def cost(a: Assessment) -> float:
        return max(a.expected_seconds + a.churn_seconds, enough)

    best_c = min(cost(a) for a in safe)
    weight = config.balanced_quality_weight

    def quality(a: Assessment) -> float:
        return top_q if a.quality >= floor_q else a.quality

    def speed(a: Assessment) -> float:
        return min(best_c / cost(a), 1.0) if cost(a) > 0 else 1.0

    def score(a: Assessment) -> float:
        if preference is Preference.QUALITY:
            value = quality(a)
        elif preference is Preference.LATENCY:
            value = speed(a)
        else:
            value = weight * quality(a) / best_q + (1 - weight) * speed(a)
        return value - AT_RISK_PENALTY if a.at_risk else value

    scored = [replace(a, score=score(a)) for a in assessments]
    # Primary: score. Secondary: the other objective, so ties resolve as the docstring says.
    if preference is Preference.LATENCY:
        scored.sort(key=lambda a: (-round(a.score / TIE_TOLERANCE), -a.quality, a.tag))
    else:
        scored.sort(key=lambda a: (-round(a.score / TIE_TOLERANCE), a.expected_seconds + a.churn_seconds,
                                   -a.quality, a.tag))
    return scored


def decide(
    request: RoutingRequest,
    candidates: Sequence[CandidateInput],
    memory: MemoryView,
    config: PolicyConfig = PolicyConfig(),
) -> Decision:
    """Pick the variant for `request` among `candidates` (the family's variants)."""
    pool = [c for c in candidates if request.pinned_tag in (None, c.variant.tag)]
    base = Decision(request.family, request.preference, None, "", pinned=request.pinned_tag is not None,
                    fallback=bool(request.excluded), memory_source=memory.source, free_bytes=memory.free_bytes)
    if not pool:
        return replace(base, reason=f"no variants of {request.family}", failure=FailureKind.EMPTY)

    reclaimable = sum(c.variant.vram_bytes for c in pool if c.variant.resident and c.in_flight == 0)
    free = memory.free_bytes - memory.reserve_bytes
    available = free + reclaimable
    family_resident = any(c.variant.resident for c in pool)
    backlog = _Backlog(memory.backlog)
    assessed = [_assess(c, request, available, family_resident, backlog, config) for c in pool]
    if request.pinned_tag is None:
        _charge_churn(assessed, pool, free, config)
        _hold_back_sub_floor(assessed, pool)
    feasible = [a for a in assessed if a.feasible]
    ranked = _rank(feasible, request.preference, config, request.time_remaining)
    scores = {a.tag: a for a in ranked}
    listed = tuple(scores.get(a.tag, a) for a in assessed)

    if not ranked:
        if all(a.memory_only for a in assessed):
            failure = FailureKind.MEMORY
        elif all(a.rejection.startswith(DEADLINE_REJECTION) for a in assessed):
            failure = FailureKind.DEADLINE
        else:
            failure = FailureKind.CONSTRAINTS
        why = "; ".join(f"{a.tag}: {a.rejection}" for a in assessed)
        return replace(base, reason=f"no variant of {request.family} can serve this request ({why})",
                       candidates=listed, failure=failure,
                       best_expected_seconds=min(a.expected_seconds for a in assessed))

    chosen = ranked[0]
    # Would the preference have picked something that memory alone ruled out?
    unconstrained = _rank([a for a in assessed if a.feasible or a.memory_only], request.preference, config,
                          request.time_remaining)
    blocked = unconstrained[0] if unconstrained and unconstrained[0].tag != chosen.tag else None
    downgraded = blocked is not None and blocked.memory_only
    reason = _explain(request, chosen, blocked if downgraded else None)
    return replace(base, chosen=chosen, reason=reason, candidates=listed, downgraded=downgraded)


def _explain(request: RoutingRequest, chosen: Assessment, blocked: Assessment | None) -> str:
    speed = f"{chosen.tokens_per_second:.0f} tok/s{'' if chosen.measured else ' (prior)'}"
    where = "resident" if chosen.resident else f"cold load ≈ {chosen.time_to_first_token:.1f} s"
    if request.pinned_tag is not None:
        head = f"pinned {chosen.tag}"
    elif request.excluded:
        head = f"fell back to {chosen.tag} after {', '.join(sorted(request.excluded))} failed"
    else:
        head = f"{request.preference.value}: {chosen.tag}"
    text = f"{head} (quality {chosen.quality:.3f}, {speed}, {where}, expected {chosen.expected_seconds:.2f} s)"
    if blocked is not None:
        text += f"; downgraded from {blocked.tag}, which {blocked.rejection}"
    return text
