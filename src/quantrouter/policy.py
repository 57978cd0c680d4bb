"""The routing decision: a pure function from plain values to an explainable `Decision`.

No I/O, no clock, no logging: the service passes in the catalog's variants, a memory view, the speed
estimates and the time left before the deadline. The model (design §5):

- memory needed = weights + f16 KV cache for num_ctx; a variant fits when it is resident, or when
  need ≤ `load_fraction` × (free − reserve + what idle variants of the same family would give back on
  eviction): Ollama loads a model beside others only within 80 % of free memory and otherwise waits for
  busy runners to finish (reference/ollama.md §3), which a routed request would spend in a queue;
- ttft = cold-load time (when not resident) + prompt tokens / prompt tok/s;
- expected time T = ttft + num_predict / decode tok/s;
- quality = the quant type's prior (quantrouter.quant).

QUALITY takes the highest quality (ties: smaller T); LATENCY the smallest T (ties: higher quality);
BALANCED maximises w·q/q_max + (1−w)·T_min/T over the feasible candidates, w = `balanced_quality_weight`.
Constraints and the deadline reject first. When memory pressure rejects the variant the preference
would have taken, the decision says `downgraded`. To keep Ollama from loading and unloading in a
thrash, a non-resident variant replaces a resident sibling only when it fits with a margin
(`upgrade_hysteresis`) to spare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from quantrouter.catalog import VariantInfo
from quantrouter.quant import QuantType
from quantrouter.throughput import SpeedEstimate
from quantrouter.units import format_bytes
from quantrouter.values import Assessment, Decision, FailureKind, Preference

__all__ = [
    "CandidateInput",
    "MemoryView",
    "PolicyConfig",
    "RoutingRequest",
    "decide",
]

# Ties within this relative margin count as equal, so the secondary key decides.
TIE_TOLERANCE = 1e-6
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


@dataclass(frozen=True, slots=True)
class MemoryView:
    free_bytes: int
    reserve_bytes: int = 0
    source: str = "static"


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    balanced_quality_weight: float = 0.5
    upgrade_hysteresis: float = 0.15
    load_fraction: float = OLLAMA_LOAD_FRACTION


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
        return f"expected {expected:.2f} s exceeds the {request.time_remaining:.2f} s left before the deadline"
    return ""


def _assess(c: CandidateInput, request: RoutingRequest, available: int, family_resident: bool,
            config: PolicyConfig) -> Assessment:
    v, speed = c.variant, c.speed
    need = _memory_needed(v, request.num_ctx)
    load = 0.0 if v.resident else speed.load_seconds
    ttft = load + request.prompt_tokens / speed.prompt_tps
    expected = ttft + request.num_predict / speed.decode_tps
    rejection = _constraint_rejection(c, request, speed, ttft, expected)
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
    return Assessment(v.tag, v.quant.name, need, v.resident, speed.decode_tps, speed.measured, ttft,
                      expected, c.quality, rejection=rejection, memory_only=memory_only)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TIE_TOLERANCE * max(abs(a), abs(b), 1.0)


def _rank(assessments: Sequence[Assessment], preference: Preference, weight: float) -> list[Assessment]:
    """Best first, each with its score set (higher is better)."""
    if not assessments:
        return []
    best_q = max(a.quality for a in assessments) or 1.0
    best_t = min(a.expected_seconds for a in assessments)

    def score(a: Assessment) -> float:
        if preference is Preference.QUALITY:
            return a.quality
        if preference is Preference.LATENCY:
            return best_t / a.expected_seconds if a.expected_seconds > 0 else 1.0
        speed = best_t / a.expected_seconds if a.expected_seconds > 0 else 1.0
        return weight * a.quality / best_q + (1 - weight) * speed

    scored = [replace(a, score=score(a)) for a in assessments]
    # Primary: score. Secondary: the other objective, so ties resolve as the docstring says.
    if preference is Preference.LATENCY:
        scored.sort(key=lambda a: (-round(a.score / TIE_TOLERANCE), -a.quality, a.tag))
    else:
        scored.sort(key=lambda a: (-round(a.score / TIE_TOLERANCE), a.expected_seconds, a.tag))
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
    available = memory.free_bytes - memory.reserve_bytes + reclaimable
    family_resident = any(c.variant.resident for c in pool)
    assessed = [_assess(c, request, available, family_resident, config) for c in pool]
    feasible = [a for a in assessed if a.feasible]
    ranked = _rank(feasible, request.preference, config.balanced_quality_weight)
    scores = {a.tag: a for a in ranked}
    listed = tuple(scores.get(a.tag, a) for a in assessed)

    if not ranked:
        only_memory = all(a.memory_only for a in assessed)
        failure = FailureKind.MEMORY if only_memory else FailureKind.CONSTRAINTS
        why = "; ".join(f"{a.tag}: {a.rejection}" for a in assessed)
        return replace(base, reason=f"no variant of {request.family} can serve this request ({why})",
                       candidates=listed, failure=failure)

    chosen = ranked[0]
    # Would the preference have picked something that memory alone ruled out?
    unconstrained = _rank([a for a in assessed if a.feasible or a.memory_only], request.preference,
                          config.balanced_quality_weight)
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
