"""What the backend holds and how much memory is free, read the way the router reads them.

The catalog comes from the router's own `Inventory` (`/api/tags`, `/api/show`, `/api/ps`, grouped by
`build_catalog` with the configured aliases), memory from its `MemoryProbe` (NVML, else a configured
capacity minus what is resident) and speeds from its `ThroughputTable` priors, so `variants --backend`
and live `recommend` see exactly what a router started on the same settings would see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quantrouter.backend import OllamaBackend
from quantrouter.calibration import measured_qualities, quality_of, starting_speeds
from quantrouter.catalog import CatalogSnapshot, VariantInfo
from quantrouter.client import VariantListing
from quantrouter.config import PolicySettings, Settings
from quantrouter.inventory import Inventory
from quantrouter.listing import variant_rows
from quantrouter.memory import MemoryProbe, MemorySnapshot, StaticSource
from quantrouter.quant import UnknownQuantizationError, parse_quantization
from quantrouter.tools.errors import ToolError

__all__ = ["BackendView", "backend_listing", "family_variants", "read_backend", "read_catalog",
           "select_quants"]


@dataclass(frozen=True, slots=True)
class BackendView:
    """One reading of the backend: its catalog, the memory free now, and the configured capacity."""

    catalog: CatalogSnapshot
    memory: MemorySnapshot


async def read_catalog(settings: Settings, host: str | None = None) -> CatalogSnapshot:
    """The backend's variants grouped into families, with residency, as the router's inventory builds them."""
    backend = OllamaBackend(settings.backend.at(host))
    try:
        inventory = Inventory(backend, settings.catalog)
        await inventory.refresh_tags()
        await inventory.refresh_ps()
    finally:
        await backend.close()
    return inventory.snapshot


async def read_backend(settings: Settings, host: str | None = None, capacity_bytes: int = 0) -> BackendView:
    """Catalog and memory now; `capacity_bytes` (else the configured capacity) stands in when NVML is absent."""
    catalog = await read_catalog(settings, host)
    resident = sum(v.vram_bytes for v in catalog.variants if v.resident)
    probe = MemoryProbe.create(StaticSource(capacity_bytes or settings.memory.capacity, lambda: resident),
                               settings.memory.nvml_poll_interval)
    try:
        memory = probe.sample()
    finally:
        probe.close()
    return BackendView(catalog, memory)


def family_variants(catalog: CatalogSnapshot, name: str) -> tuple[str, tuple[VariantInfo, ...]]:
    """The family `name` resolves to (family, alias or tag) and its variants, best quality first."""
    resolution = catalog.resolve(name)
    if resolution is None:
        known = ", ".join(catalog.families) or "none"
        raise ToolError(f"unknown family {name!r}; the backend holds: {known}")
    return resolution.family, catalog.best_first(resolution.family)


def select_quants(family: str, variants: Sequence[VariantInfo], quants: Sequence[str]) -> tuple[VariantInfo, ...]:
    """The variants with these quantization levels (all of them when `quants` is empty)."""
    if not quants:
        return tuple(variants)
    held = {v.quant.name: v for v in variants}
    chosen = []
    for text in quants:
        try:
            quant = parse_quantization(text)
        except UnknownQuantizationError as error:
            raise ToolError(str(error)) from None
        if quant.name not in held:
            raise ToolError(f"{family} has no {quant.name} variant; it has {', '.join(held)}")
        chosen.append(held[quant.name])
    return tuple(dict.fromkeys(chosen))


def backend_listing(view: BackendView, settings: PolicySettings, family: str = "") -> VariantListing:
    """The router's `ListVariants` answer, built without a router: priors, or the calibration file's figures."""
    catalog = view.catalog
    families = [family_variants(catalog, family)[0]] if family else catalog.families
    table = starting_speeds(settings, (g.name for g in view.memory.gpus)).snapshot()
    measured = measured_qualities(settings.calibration_file)
    memory = view.memory
    rows = variant_rows(catalog, table, families, lambda v: quality_of(v, measured))
    return VariantListing(rows, memory.source, memory.free_bytes, memory.total_bytes, memory.detail,
                          tuple(g.name for g in memory.gpus))
