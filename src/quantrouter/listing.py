"""Variant listings: what `ListVariants` answers and `quantrouter variants --backend` prints.

Both show a family's variants best quality first with the speed the policy would use for each, so
they build their rows here, from a catalog and a speed snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from quantrouter.catalog import CatalogSnapshot, VariantInfo
from quantrouter.throughput import SpeedEstimate, ThroughputSnapshot
from quantrouter.values import Variant

__all__ = ["variant_row", "variant_rows"]


def variant_row(v: VariantInfo, speed: SpeedEstimate, quality: tuple[float, bool]) -> Variant:
    """One variant as listings show it: what the backend holds, its decode speed (measured, else the prior)
    and `quality`, the figure the router ranks by and whether it was measured (else the quant's prior)."""
    return Variant(v.tag, v.quant.name, v.size_bytes, v.parameter_count, v.resident, v.vram_bytes,
                   speed.decode_tps, speed.measured, speed.samples, *quality)


def variant_rows(catalog: CatalogSnapshot, speeds: ThroughputSnapshot, families: Iterable[str],
                 quality_of: Callable[[VariantInfo], tuple[float, bool]]) -> dict[str, tuple[Variant, ...]]:
    """family → its variants, best quality first."""
    return {family: tuple(variant_row(v, speed, quality_of(v))
                          for v, speed in speeds.estimates(catalog.best_first(family)))
            for family in families}
