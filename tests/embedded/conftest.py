"""Embedded backends for these tests (llama.cpp, real HTTP), shared through `run_embedded_in_thread`.

The ladder and its cache dir come from tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, LadderEntry, run_embedded_in_thread

MiB = 1 << 20
# Room for every rung at once, so tests that are not about eviction never evict.
ROOMY_BUDGET = 4096 * MiB
# Fits F16 (518 MiB + 36 MiB KV at num_ctx 2048) but not F16 + Q8_0 (278 MiB + 36 MiB KV).
SMALL_BUDGET = 700 * MiB
QUEUE_LIMIT = 1


@pytest.fixture(scope="session")
def server(cache_dir: Path, ladder: list[LadderEntry]) -> Iterator[EmbeddedServer]:
    config = EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=ROOMY_BUDGET, max_queue=QUEUE_LIMIT)
    with run_embedded_in_thread(config) as running:
        yield running


@pytest.fixture(scope="session")
def small_server(cache_dir: Path, ladder: list[LadderEntry]) -> Iterator[EmbeddedServer]:
    config = EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=SMALL_BUDGET)
    with run_embedded_in_thread(config) as running:
        yield running
