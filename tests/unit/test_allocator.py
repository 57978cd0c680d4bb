"""Returning freed memory after a burst: on this machine's glibc, a trim really lowers resident memory, and an
idle router trims once enough streams have come and gone, never while one is in flight."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform

import pytest

from quantrouter.allocator import release_free_memory, trim_after_bursts

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")

BLOCKS = 16_000
BLOCK_BYTES = 2048  # above pymalloc's 512-byte limit and below malloc's mmap threshold: malloc's heap
CHECK_S = 0.01
# The idle checks that must pass without a trim before "not yet" counts.
CHECKS = 5
# Bounds a hang only: a trim that never comes.
TRIM_TIMEOUT_S = 30.0


def test_a_trim_returns_the_pages_of_freed_allocations_that_free_itself_keeps() -> None:
    blocks = [bytearray(BLOCK_BYTES) for _ in range(BLOCKS)]  # ~31 MiB, every page touched
    pinned = bytearray(BLOCK_BYTES)  # above them, so free() cannot shrink the heap's top by itself
    del blocks
    trim = release_free_memory()
    assert trim is not None
    assert trim.resident_before - trim.resident_after > BLOCKS * BLOCK_BYTES / 2
    assert trim.malloc_in_use is not None and trim.malloc_in_use < trim.resident_after
    assert pinned  # alive until here


async def test_an_idle_router_trims_after_enough_streams_and_not_while_one_is_in_flight(
        caplog: pytest.LogCaptureFixture) -> None:
    """Counted in the loop's own checks, not in seconds: a "not yet" holds after several checks, and the trim (in
    a worker thread) is waited for, so a loaded machine neither fails nor weakens it."""
    state = {"in_flight": 0, "opened": 0, "checks": 0}
    caplog.set_level(logging.INFO, logger="quantrouter.allocator")

    def trims() -> int:
        return sum("returned freed memory" in r.getMessage() for r in caplog.records)

    def in_flight() -> int:  # read once per check
        state["checks"] += 1
        return state["in_flight"]

    async def checks(count: int) -> None:
        until = state["checks"] + count
        while state["checks"] < until:
            await asyncio.sleep(CHECK_S)

    task = asyncio.create_task(trim_after_bursts(in_flight, lambda: state["opened"], after_streams=3,
                                                 interval=CHECK_S))
    try:
        state.update(opened=2)
        await checks(CHECKS)
        assert trims() == 0  # too few streams
        state.update(opened=5, in_flight=1)
        await checks(CHECKS)
        assert trims() == 0  # one still in flight
        state.update(in_flight=0)
        async with asyncio.timeout(TRIM_TIMEOUT_S):
            while trims() < 1:
                await asyncio.sleep(CHECK_S)
        assert "resident" in caplog.records[-1].getMessage()
        await checks(CHECKS)
        assert trims() == 1  # nothing new since
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
