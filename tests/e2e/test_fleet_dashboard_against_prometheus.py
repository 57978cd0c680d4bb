"""The dashboard's fleet row and the fleet alerts, evaluated by a real Prometheus scraping a real fleet
router over two real nodes (node router + embedded llama.cpp backend each, in threads of this process)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from quantrouter.client import Options, RouterClient
from quantrouter.embedded import EmbeddedConfig, LadderEntry, run_embedded_in_thread
from quantrouter.fleet.server import FleetServer, fleet_in_thread
from quantrouter.server import run_in_thread
from quantrouter.units import GiB
from tests.e2e.test_dashboard_against_prometheus import (
    alert_exprs,
    panel_queries,
    prometheus_scraping,
    query,
    wait_until_scraped,
)
from tests.fleet.conftest import fleet_settings, node_settings, wait_for
from tests.support import FAMILY

REQUESTS = 4
# QUALITY picks F16, which both 1 GiB nodes fit.
QUALITY = Options(num_predict=4, temperature=0.0, seed=1, num_ctx=1024)


@pytest.fixture(scope="module")
def fleet_and_ports(ladder: list[LadderEntry], cache_dir: Path) -> Iterator[tuple[FleetServer, list[int]]]:
    with contextlib.ExitStack() as stack:
        addresses, metrics_ports = {}, []
        for name in ("gpu-a", "gpu-b"):
            backend = stack.enter_context(run_embedded_in_thread(EmbeddedConfig(cache_dir=cache_dir,
                                                                                memory_budget_bytes=1 * GiB)))
            node = stack.enter_context(run_in_thread(node_settings(backend), CollectorRegistry()))
            addresses[name] = f"127.0.0.1:{node.port}"
            metrics_ports.append(node.metrics_port)
        fleet = stack.enter_context(fleet_in_thread(fleet_settings(addresses), CollectorRegistry()))
        wait_for(lambda: len(fleet.router.nodes.live()) == 2, what="both nodes' reports")
        yield fleet, [fleet.metrics_port, *metrics_ports]


@pytest.fixture(scope="module")
def traffic(fleet_and_ports: tuple[FleetServer, list[int]],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    fleet, ports = fleet_and_ports
    with prometheus_scraping([f"127.0.0.1:{port}" for port in ports],
                             tmp_path_factory.mktemp("prometheus-fleet")) as client:
        with RouterClient(f"127.0.0.1:{fleet.port}") as router:
            for sent in range(1, REQUESTS + 1):  # each scraped before the next: every counter gets a rate
                list(router.generate(FAMILY, "The capital of France is", preference="quality", options=QUALITY))
                wait_until_scraped(client, "quantrouter_fleet_requests_total", sent)
        yield client


@pytest.mark.parametrize(("panel", "expr"), panel_queries(fleet=True), ids=[n for n, _ in panel_queries(fleet=True)])
def test_fleet_panel_query_returns_data(panel: str, expr: str, traffic: httpx.Client) -> None:
    result = query(traffic, expr)
    assert result, f"{panel}: no series for {expr}"
    assert any(math.isfinite(float(series["value"][1])) for series in result), f"{panel}: only NaN/Inf"
    if "node" in result[0]["metric"]:
        assert {series["metric"]["node"] for series in result} <= {"gpu-a", "gpu-b"}


@pytest.mark.parametrize(("alert", "expr"), [(a, e) for a, e in alert_exprs() if "fleet" in e],
                         ids=[a for a, e in alert_exprs() if "fleet" in e])
def test_fleet_alert_evaluates_quietly_on_a_healthy_fleet(alert: str, expr: str, traffic: httpx.Client) -> None:
    assert query(traffic, expr) == [], f"{alert} would fire on a healthy fleet"
