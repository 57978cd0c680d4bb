"""Session fixtures: the model ladder, a real embedded llama.cpp backend, and a real router over gRPC.

Each runs on its own event loop in a daemon thread (quantrouter.background), so every test talks to
them over real sockets: gRPC to the router, HTTP (the ollama client) from the router to the backend.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from quantrouter.config import default_cache_dir
from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, LadderEntry, prepare_ladder, run_embedded_in_thread
from quantrouter.server import RunningServer, run_in_thread
from quantrouter.units import GiB
from tests.support import router_settings

# Room for the whole ladder at once: routing is then decided by preference, not eviction.
ROOMY_BUDGET = 4 * GiB


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return default_cache_dir(os.environ)


@pytest.fixture(scope="session")
def ladder(cache_dir: Path) -> list[LadderEntry]:
    """Built on first use (minutes on 2 cores), reused from the cache afterwards."""
    return prepare_ladder(cache_dir, progress=False)


@pytest.fixture(scope="session")
def embedded_backend(ladder: list[LadderEntry], cache_dir: Path) -> Iterator[EmbeddedServer]:
    with run_embedded_in_thread(EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=ROOMY_BUDGET)) as server:
        yield server


@pytest.fixture
def fresh_backend(ladder: list[LadderEntry], cache_dir: Path) -> Iterator[EmbeddedServer]:
    """A backend of one test's own over the cached ladder: nothing loaded, and free to delete from."""
    with run_embedded_in_thread(EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=ROOMY_BUDGET)) as server:
        yield server


@pytest.fixture(scope="session")
def router(embedded_backend: EmbeddedServer) -> Iterator[RunningServer]:
    with run_in_thread(router_settings(embedded_backend), CollectorRegistry()) as running:
        yield running


@pytest.fixture
def target(router: RunningServer) -> str:
    return f"127.0.0.1:{router.port}"
