"""Three real nodes (embedded llama.cpp backend + node router each, with different memory budgets) and a
fleet router over them, all over real sockets; each runs on its own loop in a daemon thread."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from quantrouter.config import Settings, load_settings
from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, LadderEntry, run_embedded_in_thread
from quantrouter.fleet.server import FleetServer, fleet_in_thread
from quantrouter.server import RunningServer, run_in_thread
from quantrouter.units import GiB, MiB
from tests.support import router_settings

# At num_ctx 4096 a variant needs its file + 72 MiB KV + 513 MiB compute graph, within 80 % of the free
# memory. Small fits the quantized variants up to Q5_K_M (≈ 833 MiB) but not Q8_0 (≈ 863 MiB) or F16;
# medium fits F16 (≈ 1103 MiB) with little room; large fits F16 with room to spare.
BUDGETS = {"small": 1060 * MiB, "medium": 1400 * MiB, "large": int(2.5 * GiB)}
# One context size on every router and in every request, so the fleet prices what the node loads.
NUM_CTX = 1024
# Reports often and a short staleness limit, so the tests wait seconds, not minutes.
REPORT_INTERVAL_S = 0.2
STALE_AFTER_S = 1.5


@dataclass
class Node:
    backend: EmbeddedServer
    router: RunningServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.router.port}"


def node_settings(backend: EmbeddedServer, **overrides: object) -> Settings:
    return router_settings(backend, num_ctx=NUM_CTX, **overrides)


def fleet_settings(nodes: dict[str, str], **overrides: object) -> Settings:
    flags: dict[str, object] = {"grpc_address": "127.0.0.1:0", "metrics_address": "127.0.0.1:0",
                                "nodes": [f"{name}={address}" for name, address in nodes.items()],
                                "num_ctx": NUM_CTX, "node_report_interval": REPORT_INTERVAL_S,
                                "node_stale_after": STALE_AFTER_S, "grace_period": 2.0}
    flags.update(overrides)
    return load_settings(flags, {})


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def nodes(ladder: list[LadderEntry], cache_dir: Path) -> Iterator[dict[str, Node]]:
    with contextlib.ExitStack() as stack:
        started = {}
        for name, budget in BUDGETS.items():
            backend = stack.enter_context(run_embedded_in_thread(EmbeddedConfig(cache_dir=cache_dir,
                                                                                memory_budget_bytes=budget)))
            router = stack.enter_context(run_in_thread(node_settings(backend), CollectorRegistry()))
            started[name] = Node(backend, router)
        yield started


@pytest.fixture(scope="session")
def fleet(nodes: dict[str, Node]) -> Iterator[FleetServer]:
    with fleet_in_thread(fleet_settings({name: node.address for name, node in nodes.items()}),
                         CollectorRegistry()) as running:
        wait_for(lambda: len(running.router.nodes.live()) == len(nodes), what="every node's first report")
        yield running


@pytest.fixture
def fleet_target(fleet: FleetServer) -> str:
    return f"127.0.0.1:{fleet.port}"
