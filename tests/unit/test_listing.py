"""Variant listings: best quality first per family, each row with the speed the policy would use."""

from __future__ import annotations

from quantrouter.calibration import quality_of
from quantrouter.catalog import CatalogSnapshot, VariantInfo
from quantrouter.listing import variant_rows
from quantrouter.quant import parse_quantization
from quantrouter.throughput import Observation, ThroughputTable
from quantrouter.units import NS, GiB

FAMILY = "llama3.1:8b-instruct"


def _variant(quant: str, size: int, family: str = FAMILY) -> VariantInfo:
    return VariantInfo(f"{family}-{quant.lower()}", family, parse_quantization(quant), size)


def prior_quality(variant: VariantInfo) -> tuple[float, bool]:
    """No calibration file: every row carries its quant type's prior, marked as not measured."""
    return quality_of(variant, {})


def test_rows_come_best_quality_first_with_measured_and_prior_speeds() -> None:
    catalog = CatalogSnapshot((_variant("Q4_K_M", 5 * GiB), _variant("Q8_0", 8 * GiB), _variant("Q5_K_M", 6 * GiB),
                               _variant("Q4_0", 1 * GiB, family="other:1b")))
    table = ThroughputTable(0.3, 1e12)
    table.observe(f"{FAMILY}-q5_k_m", Observation(eval_count=100, eval_duration_ns=NS))
    rows = variant_rows(catalog, table.snapshot(), [FAMILY], prior_quality)
    assert list(rows) == [FAMILY]
    assert [r.quantization for r in rows[FAMILY]] == ["Q8_0", "Q5_K_M", "Q4_K_M"]
    measured = {r.quantization: (r.measured, r.samples) for r in rows[FAMILY]}
    assert measured == {"Q8_0": (False, 0), "Q5_K_M": (True, 1), "Q4_K_M": (False, 0)}
    assert rows[FAMILY][1].tokens_per_second == 100.0
    assert [r.quality for r in rows[FAMILY]] == sorted((r.quality for r in rows[FAMILY]), reverse=True)


def test_an_unknown_family_lists_no_rows() -> None:
    assert variant_rows(CatalogSnapshot(), ThroughputTable(0.3, 1e12).snapshot(), ["none"], prior_quality) == {
        "none": ()}
