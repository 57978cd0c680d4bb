"""recommend's arithmetic against hand-computed values (docs/quantization.md §1d and §3)."""

from __future__ import annotations

import pytest

from quantrouter.catalog import Architecture, VariantInfo
from quantrouter.quant import parse_quantization
from quantrouter.tools.recommend import (
    estimated_kv_bytes,
    nominal_bits,
    offline_candidates,
    recommend_variant,
    rule_of_thumb_bytes,
    variant_candidates,
)
from quantrouter.units import GiB, MiB

LLAMA_31_8B = Architecture("llama", block_count=32, head_count_kv=8, head_dim=128, context_length=131072)
PARAMS_8B = 8_030_000_000
OLLAMA_RESERVE = 457 * MiB


@pytest.mark.parametrize(("quant", "weights"), [
    # 8.03e9 × bpw / 8, by hand (quant.md §1d gives 4.91 GB = 4.58 GiB for Q4_K_M).
    ("Q4_K_M", 4_912_754_000),
    ("Q8_0", 8_532_678_000),
    ("F16", 16_060_501_875),
    ("Q2_K", 3_171_147_375),
])
def test_offline_weights_are_parameters_times_bits_per_weight(quant: str, weights: int) -> None:
    [candidate] = offline_candidates(PARAMS_8B, 8192, LLAMA_31_8B, [parse_quantization(quant)])
    assert candidate.weights_bytes == pytest.approx(weights, abs=1)


@pytest.mark.parametrize(("context", "kv"), [(2048, 256 * MiB), (8192, 1 * GiB), (131072, 16 * GiB)])
def test_kv_cache_follows_the_architecture(context: int, kv: int) -> None:
    [candidate] = offline_candidates(PARAMS_8B, context, LLAMA_31_8B, [parse_quantization("Q4_K_M")])
    assert (candidate.kv_bytes, candidate.kv_estimated) == (kv, False)


def test_without_an_architecture_the_kv_cache_is_scaled_from_llama_31_8b() -> None:
    assert estimated_kv_bytes(PARAMS_8B, 8192) == pytest.approx(GiB, abs=1)
    assert estimated_kv_bytes(PARAMS_8B // 2, 8192) == pytest.approx(GiB / 2, abs=1)
    [candidate] = offline_candidates(PARAMS_8B, 8192, None, [parse_quantization("Q8_0")])
    assert candidate.kv_estimated


@pytest.mark.parametrize(("quant", "bits", "rule"), [
    ("Q4_K_M", 4, 4_200_000_000), ("Q5_K_M", 5, 5_250_000_000), ("Q8_0", 8, 8_400_000_000),
    ("F16", 16, 16_800_000_000), ("IQ4_XS", 4, 4_200_000_000), ("BF16", 16, 16_800_000_000),
])
def test_rule_of_thumb_is_gb_per_billion_times_1_2(quant: str, bits: int, rule: int) -> None:
    q = parse_quantization(quant)
    assert nominal_bits(q) == bits
    assert rule_of_thumb_bytes(7_000_000_000, q) == rule


def test_llama_31_8b_on_8_gib_at_8k_context_takes_q6_k() -> None:
    r = recommend_variant(offline_candidates(PARAMS_8B, 8192, LLAMA_31_8B), 8 * GiB, OLLAMA_RESERVE, 8192)
    assert r.chosen is not None and r.chosen.candidate.label == "Q6_K"
    q4 = next(e for e in r.estimates if e.candidate.label == "Q4_K_M")
    assert q4.total_bytes == 4_912_754_000 + GiB
    q8 = next(e for e in r.estimates if e.candidate.label == "Q8_0")
    assert not q8.fits and q8.total_bytes == 8_532_678_000 + GiB
    assert "Q6_K is the highest-quality choice that fits" in r.reason and "Q8_0, would need" in r.reason
    assert [e.quality for e in r.estimates] == sorted((e.quality for e in r.estimates), reverse=True)


@pytest.mark.parametrize(("vram", "context", "chosen", "rule_choice", "overruled"), [
    # 6 GiB: the rule forgets the 1 GiB KV cache and the reserve, and says Q5_K_M.
    (6 * GiB, 8192, "IQ4_XS", "Q5_K_M", {"Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_1"}),
    # 10 GiB at a short context: both land on Q8_0 and agree everywhere.
    (10 * GiB, 2048, "Q8_0", "Q8_0", set()),
    # 4 GiB at 128k: the KV cache alone is 16 GiB; nothing fits, yet the rule (3 bits × 1.2) picks Q3_K_L.
    (4 * GiB, 131072, None, "Q3_K_L", {"Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K_S", "Q2_K"}),
])
def test_where_the_rule_of_thumb_says_otherwise(vram: int, context: int, chosen: str | None, rule_choice: str,
                                                overruled: set[str]) -> None:
    arch = LLAMA_31_8B if context != 8192 else None
    r = recommend_variant(offline_candidates(PARAMS_8B, context, arch), vram, OLLAMA_RESERVE, context)
    assert (r.chosen.candidate.label if r.chosen else None) == chosen
    assert r.rule_choice is not None and r.rule_choice.candidate.label == rule_choice
    assert {e.candidate.label for e in r.estimates if e.rule_fits and not e.fits} == overruled
    assert (f"the rule would pick {rule_choice}" in " ".join(r.disagreements)) == (chosen != rule_choice)
    if chosen is None:
        assert r.reason.startswith("nothing fits")


def test_live_candidates_use_the_real_file_size_and_architecture() -> None:
    variant = VariantInfo("gemma3:270m-q8_0", "gemma3:270m", parse_quantization("Q8_0"), 291_545_000,
                          268_098_176, Architecture("gemma3", 18, 1, 256, 32768))
    [c] = variant_candidates([variant], 4096)
    assert (c.weights_bytes, c.kv_bytes, c.kv_estimated) == (291_545_000, 2 * 18 * 4096 * 1 * 256 * 2, False)
    assert c.parameter_count == 268_098_176
