"""Quant parsing and the quality table: the names Ollama reports must map to the right type."""

from __future__ import annotations

import pytest

from quantrouter.quant import (
    QUANT_TYPES,
    UnknownQuantizationError,
    by_file_type,
    parse_quantization,
    quality_order,
)

# Llama-3.1-8B has 8.03e9 parameters; Q4_K_M at 4.8944 bpw is 4.91 GB (docs/quantization.md §1d).
LLAMA_3_1_8B_PARAMS = 8_030_000_000


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("q4_K_M", "Q4_K_M"),
        ("Q4_K_M", "Q4_K_M"),
        ("  q8_0 ", "Q8_0"),
        ("fp16", "F16"),
        ("F16", "F16"),
        ("bf16", "BF16"),
        ("fp32", "F32"),
        ("Q4_K", "Q4_K_M"),
        ("q5_k", "Q5_K_M"),
        ("Q3_K", "Q3_K_M"),
        ("iq4_xs", "IQ4_XS"),
        ("q2_K", "Q2_K"),
    ],
)
def test_parse_quantization_accepts_ollama_spellings(text: str, name: str) -> None:
    assert parse_quantization(text).name == name


@pytest.mark.parametrize("text", ["q4", "Q4_K_X", "", "int4", "q4_K_M_extra"])
def test_parse_quantization_rejects_unknown_names(text: str) -> None:
    with pytest.raises(UnknownQuantizationError, match="unknown quantization") as info:
        parse_quantization(text)
    assert "Q4_K_M" in str(info.value), "the error lists the known names"


@pytest.mark.parametrize(
    ("file_type", "name"),
    # LlamaFileType numbers (docs/quantization.md §4); Q8_0 is file type 7 though its tensor type is 8.
    [(0, "F32"), (1, "F16"), (2, "Q4_0"), (7, "Q8_0"), (10, "Q2_K"), (15, "Q4_K_M"), (18, "Q6_K"), (32, "BF16")],
)
def test_by_file_type_uses_the_gguf_numbering(file_type: int, name: str) -> None:
    assert by_file_type(file_type).name == name


@pytest.mark.parametrize("file_type", [4, 5, 6, 1024, -1])
def test_by_file_type_rejects_removed_and_unknown_numbers(file_type: int) -> None:
    with pytest.raises(UnknownQuantizationError, match=str(file_type)):
        by_file_type(file_type)


def test_quality_follows_the_kld_scoreboard_order() -> None:
    """docs/quantization.md §1b: mean KLD rises strictly along this chain for LLaMA 3 8B."""
    chain = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]
    qualities = [parse_quantization(name).quality for name in chain]
    assert qualities == sorted(qualities, reverse=True)
    assert len(set(qualities)) == len(qualities)


@pytest.mark.parametrize(
    ("name", "top_token_agreement"),
    # "Same top p" against FP16 (docs/quantization.md §1b).
    [("Q2_K", 0.71138), ("Q4_K_M", 0.91901), ("Q6_K", 0.96031), ("Q8_0", 0.97674)],
)
def test_quality_prior_is_the_measured_top_token_agreement(name: str, top_token_agreement: float) -> None:
    assert parse_quantization(name).quality == pytest.approx(top_token_agreement, abs=1e-3)


@pytest.mark.parametrize(
    ("name", "gigabytes"),
    # 8.03e9 × file bpw / 8 (docs/quantization.md §1d, computed): Q4_K_M 4.91, Q8_0 8.53, F16 16.06.
    [("Q4_K_M", 4.913), ("Q8_0", 8.533), ("F16", 16.061)],
)
def test_weights_bytes_from_bits_per_weight(name: str, gigabytes: float) -> None:
    assert parse_quantization(name).weights_bytes(LLAMA_3_1_8B_PARAMS) / 1e9 == pytest.approx(gigabytes, abs=0.002)


def test_quality_order_puts_higher_quality_first_and_breaks_ties_by_size() -> None:
    ordered = quality_order([parse_quantization(n) for n in ("Q4_K_M", "F32", "Q8_0", "F16", "Q2_K")])
    # F32 and F16 share quality 1.0; the larger file keeps more precision, so F32 comes first.
    assert [q.name for q in ordered] == ["F32", "F16", "Q8_0", "Q4_K_M", "Q2_K"]


def test_table_names_and_file_types_are_unique() -> None:
    assert len({q.name for q in QUANT_TYPES}) == len(QUANT_TYPES)
    assert len({q.file_type for q in QUANT_TYPES}) == len(QUANT_TYPES)
