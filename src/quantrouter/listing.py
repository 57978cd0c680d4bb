"""Variant listings: what `ListVariants` answers and `quantrouter variants --backend` prints.

Both show a family's variants best quality first with the speed the policy would use for each, so
they build their rows here, from a catalog and a speed snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable

from quantrouter.catalog import CatalogSnapshot, VariantInfo
from quantrouter.throughput import SpeedEstimate, ThroughputSnapshot
from quantrouter.values import Variant

__all__ = ["variant_row", "variant_rows"]


def variant_row(v: VariantInfo, speed: SpeedEstimate) -> Variant:
    """One variant as listings show it: what the backend holds, and its decode speed (measured, else the prior)."""
    return Variant(v.tag, v.quant.name, v.size_bytes, v.parameter_count, v.resident, v.vram_bytes,
                   speed.decode_tps, speed.measured, speed.samples, v.quant.quality)


def variant_rows(catalog: CatalogSnapshot, speeds: ThroughputSnapshot,
                 families: Iterable[str]) -> dict[str, tuple[Variant, ...]]:
    """family → its variants, best quality first."""
    return {family: tuple(variant_row(v, speed) for v, speed in speeds.estimates(catalog.best_first(family)))
            for family in families}
