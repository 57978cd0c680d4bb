"""Giving freed memory back to the system after a burst of streams (glibc only; elsewhere a no-op).

A burst of a thousand streams leaves freed memory in glibc's malloc (5-7 MiB after 1,000 streams,
bench/results/load-1000.md), which keeps free pages for the next burst. `malloc_trim(0)` returns every arena's
wholly free pages (glibc ≥ 2.8 releases the middle of a heap too, not only its top). It runs once the router is
idle after enough streams, in a worker thread, so that no request waits on it. Each trim logs resident memory
before and after it and the bytes malloc has in use (`mallinfo2`, glibc ≥ 2.33). Most of what stays above the
baseline is not malloc's: CPython's small-object allocator keeps each 1 MiB arena that still holds one allocated
block (a live object, or one kept on a free list for reuse), which no trim can return (the file's reading gives
both figures).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from quantrouter.units import MiB

__all__ = ["TRIM_AFTER_STREAMS", "TRIM_CHECK_S", "Trim", "malloc_in_use", "release_free_memory", "trim_after_bursts"]

log = logging.getLogger(__name__)

# Streams opened since the last trim before an idle router trims again: after a few requests there is too
# little to return to be worth the page faults of growing the heap again.
TRIM_AFTER_STREAMS = 64
# How often the router looks whether it is idle.
TRIM_CHECK_S = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (malloc.h), every field a size_t."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc_function(name: str, restype: type, argtypes: list[type]) -> Callable[..., object] | None:
    """A glibc function, or None where the C library lacks it (musl, macOS, an older glibc)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.restype, function.argtypes = restype, argtypes
    return function  # type: ignore[no-any-return]


_MALLOC_TRIM = _libc_function("malloc_trim", ctypes.c_int, [ctypes.c_size_t])
_MALLINFO2 = _libc_function("mallinfo2", _MallInfo2, [])


@dataclass(frozen=True, slots=True)
class Trim:
    """One trim: resident bytes before and after it, and malloc's bytes in use (None: not glibc ≥ 2.33)."""

    resident_before: int
    resident_after: int
    malloc_in_use: int | None


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def malloc_in_use() -> int | None:
    """The bytes malloc has handed out and not had back (`mallinfo2`); None where the C library cannot tell."""
    info = _MALLINFO2() if _MALLINFO2 is not None else None
    return info.uordblks if isinstance(info, _MallInfo2) else None


def release_free_memory() -> Trim | None:
    """Return malloc's wholly free pages to the system; None where this C library cannot (not glibc)."""
    if _MALLOC_TRIM is None:
        return None
    before = _resident_bytes()
    _MALLOC_TRIM(0)
    return Trim(before, _resident_bytes(), malloc_in_use())


async def trim_after_bursts(in_flight: Callable[[], int], opened: Callable[[], int],
                            after_streams: int = TRIM_AFTER_STREAMS, interval: float = TRIM_CHECK_S) -> None:
    """Run for ever: whenever nothing is in flight and `after_streams` streams were opened since the last trim,
    trim in a worker thread and log what it returned."""
    if _MALLOC_TRIM is None:
        log.info("malloc_trim is not available (not glibc): memory freed after a burst stays with the allocator")
        return
    trimmed_at = opened()
    while True:
        await asyncio.sleep(interval)
        count = opened()
        if in_flight() or count - trimmed_at < after_streams:
            continue
        trimmed_at = count
        trim = await asyncio.to_thread(release_free_memory)
        if trim is not None:
            in_use = "" if trim.malloc_in_use is None else f" (malloc has {trim.malloc_in_use / MiB:.1f} MiB in use)"
            log.info("idle after %d streams, returned freed memory: resident %.1f → %.1f MiB%s", count,
                     trim.resident_before / MiB, trim.resident_after / MiB, in_use)
