"""Embedded backends for these tests (llama.cpp, real HTTP), shared through `run_embedded_in_thread`.

The ladder and its cache dir come from tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, LadderEntry, run_embedded_in_thread
from quantrouter.units import MiB

# Room for every rung at once (≈ 2.2 GiB of weights, and 36 MiB of KV cache plus a 514.5 MiB compute
# buffer each at num_ctx 2048), so tests that are not about eviction never evict.
ROOMY_BUDGET = 8192 * MiB
# Fits F16 (≈ 1067 MiB at num_ctx 2048) and Q4_0 + Q8_0 (≈ 780 + 827 MiB), not F16 + Q8_0.
SMALL_BUDGET = 1750 * MiB
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
