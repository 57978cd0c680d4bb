"""GPU memory free right now: NVML where a GPU is visible, else a static capacity minus what is resident.

`NvmlSource` takes the pynvml module (or anything with its functions) as an argument, so tests can
hand it a stand-in with NVML's real shapes. `MemoryProbe` samples in the background at a bounded
rate (NVML calls hold the driver's lock: docs/quantization.md §5) and never on the request path. When
NVML is absent it says why and uses the static source; when NVML fails at runtime it degrades to the
static source, says so, and tries NVML again on the next sample.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from quantrouter.policy import STATIC_SOURCE

__all__ = [
    "GpuMemory",
    "MemoryProbe",
    "MemorySnapshot",
    "NvmlSource",
    "NvmlUnavailable",
    "StaticSource",
    "load_pynvml",
]

log = logging.getLogger(__name__)

NVML = "nvml"


@dataclass(frozen=True, slots=True)
class GpuMemory:
    uuid: str
    name: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class MemorySnapshot:
    source: str
    gpus: tuple[GpuMemory, ...]
    detail: str = ""
    taken_at: float = 0.0

    @property
    def free_bytes(self) -> int:
        return sum(g.free_bytes for g in self.gpus)

    @property
    def total_bytes(self) -> int:
        return sum(g.total_bytes for g in self.gpus)


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used (no library, no driver, no devices); the message says which."""


def load_pynvml() -> ModuleType:
    """Import nvidia-ml-py's `pynvml`, or explain that the `gpu` extra is missing."""
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("nvidia-ml-py is not installed (pip install 'quantrouter[gpu]')") from None
    module: ModuleType = pynvml
    return module


class NvmlSource:
    """Free and total memory of every GPU NVML sees, by UUID (NVML ignores CUDA_VISIBLE_DEVICES)."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._initialised = False

    def start(self) -> None:
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as error:
            raise NvmlUnavailable(f"NVML unavailable: {error}") from None
        self._initialised = True
        if self._nvml.nvmlDeviceGetCount() == 0:
            raise NvmlUnavailable("NVML sees no GPU")

    def read(self, now: float) -> MemorySnapshot:
        """One sample; raises `nvml.NVMLError` on a runtime failure (GPU lost, permission...)."""
        nvml = self._nvml
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuMemory(str(nvml.nvmlDeviceGetUUID(handle)), str(nvml.nvmlDeviceGetName(handle)),
                                  int(info.free), int(info.total)))
        return MemorySnapshot(NVML, tuple(gpus), taken_at=now)

    def close(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as error:
                log.warning("nvml shutdown failed: %s", error)


class StaticSource:
    """A configured capacity minus the `size_vram` the backend reports resident (`/api/ps`)."""

    def __init__(self, capacity_bytes: int, resident_bytes: Callable[[], int],
                 name: str = "configured capacity") -> None:
        self._capacity = capacity_bytes
        self._resident_bytes = resident_bytes
        self._name = name

    def read(self, now: float, detail: str = "") -> MemorySnapshot:
        free = max(self._capacity - self._resident_bytes(), 0)
        return MemorySnapshot(STATIC_SOURCE, (GpuMemory("static", self._name, free, self._capacity),), detail, now)


class MemoryProbe:
    """Keeps the latest snapshot; `run()` samples until cancelled."""

    def __init__(self, static: StaticSource, nvml: NvmlSource | None, interval: float, detail: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._static = static
        self._nvml = nvml
        self._interval = interval
        self._clock = clock
        self._detail = detail
        self.nvml_errors = 0
        self.latest = self.sample()  # NVML may start and then fail its first read: degrade, don't crash

    @classmethod
    def create(cls, static: StaticSource, interval: float,
               nvml_loader: Callable[[], Any] = load_pynvml) -> MemoryProbe:
        """NVML when it starts; otherwise static, with the reason kept for `ListVariants` and logs."""
        try:
            source = NvmlSource(nvml_loader())
            source.start()
        except NvmlUnavailable as error:
            log.info("memory source static: %s", error)
            return cls(static, None, interval, f"{error}: using the configured capacity")
        return cls(static, source, interval)

    def sample(self) -> MemorySnapshot:
        now = self._clock()
        if self._nvml is not None:
            try:
                self.latest = self._nvml.read(now)
                return self.latest
            except Exception as error:  # any NVMLError subclass; the module is injected
                self.nvml_errors += 1
                self._detail = f"NVML failed ({error}): using the configured capacity until it recovers"
                log.warning("nvml read failed, degrading to static: %s", error)
        self.latest = self._static.read(now, self._detail)
        return self.latest

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample) if self._nvml is not None else self.sample()
            await asyncio.sleep(self._interval)

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
