"""Keeps the catalog fresh from the backend: `/api/tags` + `/api/show` slowly, `/api/ps` often.

The request path only reads `snapshot`; the loops here do the I/O. A failed refresh keeps the last
good catalog and marks the backend down, so routing continues on what was known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from quantrouter.backend import Backend, ShownModel
from quantrouter.catalog import CatalogSnapshot, VariantInfo, build_catalog
from quantrouter.config import CatalogSettings
from quantrouter.errors import BackendError
from quantrouter.quant import UnknownQuantizationError, parse_quantization

__all__ = ["Inventory"]

log = logging.getLogger(__name__)


class Inventory:
    def __init__(self, backend: Backend, settings: CatalogSettings) -> None:
        self._backend = backend
        self._settings = settings
        self._aliases = dict(settings.aliases)
        self._shown: dict[tuple[str, int], ShownModel] = {}
        self._listed = CatalogSnapshot()
        self._resident: dict[str, tuple[int, int]] = {}
        self._poke = asyncio.Event()
        self.snapshot = CatalogSnapshot()
        self.loaded = False
        self.backend_up = False

    async def refresh_tags(self) -> None:
        """Re-read `/api/tags`; `/api/show` only for tags not seen before (or whose size changed)."""
        listed = await self._backend.list_models()
        variants, details = [], {}
        for m in listed:
            try:
                quant = parse_quantization(m.quantization_level)
            except UnknownQuantizationError:
                log.warning("skipping %s: unknown quantization level %r", m.tag, m.quantization_level)
                continue
            key = (m.tag, m.size_bytes)
            if key not in self._shown:
                self._shown[key] = await self._backend.show(m.tag)
            shown = self._shown[key]
            variants.append(VariantInfo(m.tag, "", quant, m.size_bytes, shown.parameter_count, shown.architecture))
            details[m.tag] = (m.family, m.parameter_size)
        self._listed = build_catalog(variants, details, self._aliases)
        self.snapshot = self._listed.with_residency(self._resident)
        self.loaded = True

    async def refresh_ps(self) -> None:
        running = await self._backend.ps()
        self._resident = {m.tag: (m.size_vram, m.context_length) for m in running}
        self.snapshot = self._listed.with_residency(self._resident)

    def resident_vram(self) -> int:
        return sum(vram for vram, _ in self._resident.values())

    def poke(self) -> None:
        """Ask for an early `/api/ps` refresh (a request just loaded or finished with a variant)."""
        self._poke.set()

    async def refresh(self, full: bool = True) -> bool:
        """One refresh (`full` includes `/api/tags`); returns whether the backend answered."""
        try:
            if full:
                await self.refresh_tags()
            await self.refresh_ps()
        except BackendError as error:
            if self.backend_up:
                log.warning("backend refresh failed: %s", error)
            self.backend_up = False
            return False
        self.backend_up = True
        return True

    async def run(self) -> None:
        tags_interval, ps_interval = self._settings.tags_refresh_interval, self._settings.ps_refresh_interval
        loop = asyncio.get_running_loop()
        next_tags = loop.time() + tags_interval
        while True:
            self._poke.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that lands as the
            # event is set (CPython gh-86296), and a poke comes from every finishing stream, so cancelling
            # this loop at shutdown could leave it running for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ps_interval):
                    await self._poke.wait()
            full = loop.time() >= next_tags or not self.backend_up or not self.loaded
            if await self.refresh(full) and full:
                next_tags = loop.time() + tags_interval
