"""Quantization types: their names, sizes and quality priors, and parsing Ollama's strings.

Sources (see docs/quantization.md):
- file-level bits/weight: llama.cpp `tools/quantize/README.md` (Llama-3.1-8B), else the size column of
  `tools/quantize/quantize.cpp` QUANT_OPTIONS divided by Llama-3-8B's 8.03e9 parameters;
- quality: top-token agreement with FP16 ("same top p") from llama.cpp `tools/perplexity/README.md`
  (LLaMA-3-8B, wikitext-2). Where that README gives only RMS Δp, agreement is estimated by the line
  through its measured points, agreement ≈ 99.25 % − 1.312 × RMS Δp (fits q2_K…q8_0 within 0.2 points).
- GGUF `general.file_type` numbers: `gguf-py/gguf/constants.py` LlamaFileType.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "KV_CACHE_TYPES",
    "QUANT_TYPES",
    "QuantType",
    "UnknownQuantizationError",
    "by_file_type",
    "parse_quantization",
    "quality_key",
    "quality_order",
]


@dataclass(frozen=True, slots=True)
class QuantType:
    """One GGUF file type as Ollama names it in `details.quantization_level`."""

    name: str
    file_type: int
    bits_per_weight: float
    quality: float

    def weights_bytes(self, parameter_count: int) -> int:
        """Estimated file size for a model of `parameter_count` weights (bytes ≈ n × bpw / 8)."""
        return int(parameter_count * self.bits_per_weight / 8)


class UnknownQuantizationError(ValueError):
    """A quantization name that is not a GGUF file type Ollama reports."""


QUANT_TYPES: tuple[QuantType, ...] = (
    QuantType("F32", 0, 32.0, 1.0),
    QuantType("F16", 1, 16.0005, 1.0),
    QuantType("BF16", 32, 16.0, 0.9974),
    QuantType("Q8_0", 7, 8.5008, 0.9767),
    QuantType("Q6_K", 18, 6.5633, 0.9603),
    QuantType("Q5_K_M", 17, 5.7036, 0.9510),
    QuantType("Q5_K_S", 16, 5.5704, 0.9411),
    QuantType("Q5_1", 9, 6.04, 0.9384),
    QuantType("Q5_0", 8, 5.57, 0.9317),
    QuantType("Q4_K_M", 15, 4.8944, 0.9190),
    QuantType("IQ4_XS", 30, 4.4597, 0.9132),
    QuantType("Q4_K_S", 14, 4.6672, 0.9064),
    QuantType("Q4_0", 2, 4.64, 0.8818),
    QuantType("Q4_1", 3, 5.11, 0.8808),
    QuantType("Q3_K_L", 13, 4.2979, 0.8688),
    QuantType("Q3_K_M", 12, 4.00, 0.8586),
    QuantType("Q3_K_S", 11, 3.65, 0.7886),
    QuantType("Q2_K_S", 21, 3.17, 0.7200),
    QuantType("Q2_K", 10, 3.1593, 0.7114),
)

# Bytes per KV cache element by OLLAMA_KV_CACHE_TYPE ("" is f16), from llama.cpp's block sizes: what a runner
# really holds (q8_0 34 B and q4_0 18 B per 32 elements; reference/quant.md §3).
KV_CACHE_TYPES: dict[str, float] = {"": 2.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

_BY_NAME = {q.name: q for q in QUANT_TYPES}
_BY_FILE_TYPE = {q.file_type: q for q in QUANT_TYPES}
# Spellings seen in Ollama library tags and llama.cpp's quantize aliases.
_ALIASES = {"FP16": "F16", "FP32": "F32", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}


def parse_quantization(text: str) -> QuantType:
    """The quant type for an Ollama `quantization_level` or tag suffix, case-insensitive."""
    key = text.strip().upper()
    key = _ALIASES.get(key, key)
    try:
        return _BY_NAME[key]
    except KeyError:
        known = ", ".join(q.name for q in QUANT_TYPES)
        raise UnknownQuantizationError(f"unknown quantization {text!r}; known: {known}") from None


def by_file_type(file_type: int) -> QuantType:
    """The quant type for a GGUF `general.file_type` value."""
    try:
        return _BY_FILE_TYPE[file_type]
    except KeyError:
        raise UnknownQuantizationError(f"unknown GGUF file type {file_type}") from None


def quality_key(quant: QuantType) -> tuple[float, float]:
    """Sort key, highest quality first; equal quality goes to the larger file (more precision kept)."""
    return -quant.quality, -quant.bits_per_weight


def quality_order(types: Iterable[QuantType]) -> list[QuantType]:
    return sorted(types, key=quality_key)
