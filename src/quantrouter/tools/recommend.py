"""Which quantization fits a memory budget, and why: pure arithmetic, no I/O.

A variant needs its weights plus the KV cache for the context (docs/quantization.md §1d and §3):

- weights = parameters × file bits/weight ÷ 8 (the `QuantType` table), or the real file size when the
  backend holds the variant;
- KV cache = 2 × layers × context × KV heads × head_dim × 2 bytes (f16), `Architecture.kv_cache_bytes`,
  when the architecture is known. Otherwise it is estimated from the parameter count by scaling
  Llama-3.1-8B's 128 KiB per token for 8.03e9 parameters (a grouped-query model; older models without
  GQA need up to four times more, so give the architecture when it matters);
- the budget loses the backend's reserve (Ollama keeps 457 MiB per CUDA GPU, `ml/device.go`).

The recommendation is the highest-quality type that fits. Beside it stands the common rule of thumb —
GB per billion parameters (nominal bits ÷ 8) × 1.2 against the whole budget — which ignores the KV
cache, the reserve and the real bits/weight; every row where it gives another answer is listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from quantrouter.catalog import Architecture, VariantInfo
from quantrouter.quant import QUANT_TYPES, QuantType, quality_order
from quantrouter.units import format_bytes

__all__ = [
    "Candidate",
    "Estimate",
    "Recommendation",
    "estimated_kv_bytes",
    "nominal_bits",
    "offline_candidates",
    "recommend_variant",
    "rule_of_thumb_bytes",
    "variant_candidates",
]

# Llama-3.1-8B: 32 layers × 8 KV heads × head_dim 128 × 2 (K, V) × 2 bytes = 128 KiB per token (quant.md §3).
REFERENCE_KV_BYTES_PER_TOKEN = 128 * 1024
REFERENCE_PARAMETERS = 8.03e9
# The rule of thumb's safety margin ("times 1.2").
RULE_MARGIN = 1.2
_NOMINAL_BITS = re.compile(r"\d+")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One quant type (offline) or one real variant (live) with what it weighs."""

    label: str
    quant: QuantType
    parameter_count: int
    weights_bytes: int
    kv_bytes: int
    kv_estimated: bool


@dataclass(frozen=True, slots=True)
class Estimate:
    """A candidate measured against the budget, and what the rule of thumb says of it."""

    candidate: Candidate
    total_bytes: int
    fits: bool
    rule_bytes: int
    rule_fits: bool

    @property
    def quality(self) -> float:
        return self.candidate.quant.quality


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Every candidate's estimate against the budget, the pick, and what the rule of thumb would pick."""

    budget_bytes: int
    reserve_bytes: int
    context: int
    estimates: tuple[Estimate, ...]
    chosen: Estimate | None
    reason: str
    rule_choice: Estimate | None
    disagreements: tuple[str, ...]

    @property
    def available_bytes(self) -> int:
        return self.budget_bytes - self.reserve_bytes


def nominal_bits(quant: QuantType) -> int:
    """The bits the name advertises (Q4_K_M → 4, F16 → 16): what the rule of thumb counts."""
    match = _NOMINAL_BITS.search(quant.name)
    return int(match.group()) if match else round(quant.bits_per_weight)


def rule_of_thumb_bytes(parameter_count: int, quant: QuantType) -> int:
    """GB per billion parameters × 1.2, as the common helper computes it."""
    return int(parameter_count * nominal_bits(quant) / 8 * RULE_MARGIN)


def estimated_kv_bytes(parameter_count: int, context: int) -> int:
    """f16 KV cache for `context` tokens when the architecture is unknown (see the module docstring)."""
    return int(context * REFERENCE_KV_BYTES_PER_TOKEN * parameter_count / REFERENCE_PARAMETERS)


def _kv(parameter_count: int, architecture: Architecture | None, context: int) -> tuple[int, bool]:
    if architecture is not None:
        return architecture.kv_cache_bytes(context), False
    return estimated_kv_bytes(parameter_count, context), True


def offline_candidates(parameter_count: int, context: int, architecture: Architecture | None = None,
                       types: Iterable[QuantType] = QUANT_TYPES) -> list[Candidate]:
    """Every quant type for a model of `parameter_count` weights, sized from the bits/weight table."""
    kv, estimated = _kv(parameter_count, architecture, context)
    return [Candidate(q.name, q, parameter_count, q.weights_bytes(parameter_count), kv, estimated) for q in types]


def variant_candidates(variants: Iterable[VariantInfo], context: int) -> list[Candidate]:
    """The variants a backend really holds, sized by their files; KV from `/api/show` when it was given."""
    result = []
    for v in variants:
        parameters = v.parameter_count or int(v.size_bytes * 8 / v.quant.bits_per_weight)
        kv, estimated = _kv(parameters, v.architecture, context)
        result.append(Candidate(v.tag, v.quant, parameters, v.size_bytes, kv, estimated))
    return result


def recommend_variant(candidates: Sequence[Candidate], budget_bytes: int, reserve_bytes: int,
                      context: int) -> Recommendation:
    """Assess every candidate against `budget_bytes − reserve_bytes` and pick the best that fits."""
    available = budget_bytes - reserve_bytes
    estimates = []
    for c in candidates:
        total = c.weights_bytes + c.kv_bytes
        rule = rule_of_thumb_bytes(c.parameter_count, c.quant)
        estimates.append(Estimate(c, total, total <= available, rule, rule <= budget_bytes))
    ranked = _ranked(estimates)
    chosen = next((e for e in ranked if e.fits), None)
    rule_choice = next((e for e in ranked if e.rule_fits), None)
    return Recommendation(budget_bytes, reserve_bytes, context, tuple(ranked), chosen,
                          _reason(ranked, chosen, available, context),
                          rule_choice, _disagreements(ranked, chosen, rule_choice, available, context))


def _ranked(estimates: Sequence[Estimate]) -> list[Estimate]:
    order = {q: i for i, q in enumerate(quality_order({e.candidate.quant for e in estimates}))}
    return sorted(estimates, key=lambda e: (order[e.candidate.quant], e.candidate.label))


def _parts(e: Estimate, context: int) -> str:
    kv = "estimated " if e.candidate.kv_estimated else ""
    return (f"weights {format_bytes(e.candidate.weights_bytes)} + {kv}KV {format_bytes(e.candidate.kv_bytes)} "
            f"for {context} tokens")


def _reason(ranked: Sequence[Estimate], chosen: Estimate | None, available: int, context: int) -> str:
    if not ranked:
        return "no candidates"
    if chosen is None:
        smallest = min(ranked, key=lambda e: e.total_bytes)
        return (f"nothing fits in {format_bytes(available)}: the smallest, {smallest.candidate.label}, needs "
                f"{format_bytes(smallest.total_bytes)} ({_parts(smallest, context)}); shorten the context, "
                "use a smaller model or free memory")
    text = (f"{chosen.candidate.label} is the highest-quality choice that fits: {format_bytes(chosen.total_bytes)} "
            f"({_parts(chosen, context)}) of {format_bytes(available)} available, quality prior {chosen.quality:.3f}")
    better = [e for e in ranked if e.quality > chosen.quality]
    if better:
        nearest = better[-1]
        text += (f"; the next better, {nearest.candidate.label}, would need {format_bytes(nearest.total_bytes)}")
    return text


def _disagreements(ranked: Sequence[Estimate], chosen: Estimate | None, rule_choice: Estimate | None,
                   available: int, context: int) -> tuple[str, ...]:
    notes = []
    for e in ranked:
        if e.rule_fits and not e.fits:
            notes.append(f"{e.candidate.label}: the rule says it fits ({format_bytes(e.rule_bytes)}), but it needs "
                         f"{format_bytes(e.total_bytes)} ({_parts(e, context)}) of {format_bytes(available)}")
        elif e.fits and not e.rule_fits:
            notes.append(f"{e.candidate.label}: the rule says no ({format_bytes(e.rule_bytes)}), but it needs only "
                         f"{format_bytes(e.total_bytes)} of {format_bytes(available)}")
    if rule_choice is not None and (chosen is None or rule_choice.candidate != chosen.candidate):
        notes.append(f"the rule would pick {rule_choice.candidate.label}; "
                     + (f"this picks {chosen.candidate.label}" if chosen else "nothing fits"))
    return tuple(notes)
