"""Every dashboard query and alert expression, evaluated by a real Prometheus that scrapes a real router.

The router runs on the embedded llama.cpp backend (`quantrouter serve --embedded`, the ladder from
`make prepare`) and Prometheus is Debian's server on loopback, scraping every second. After traffic with
each preference, each panel query must parse and return data, each alert expression must parse, and
Prometheus must evaluate the rules file without errors. Grafana's variables are replaced the way
Grafana would with "All" selected.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quantrouter.v1 import router_service_pb2, router_service_pb2_grpc
from tests.hardening.helpers import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "quantrouter-dashboard.json"
RULES = REPO / "deploy" / "prometheus" / "quantrouter-rules.yaml"
READY_SERVICE = "quantrouter.v1.RouterService"
FAMILY = "gemma3:270m"
PREFERENCES = (router_service_pb2.PREFERENCE_QUALITY, router_service_pb2.PREFERENCE_BALANCED,
               router_service_pb2.PREFERENCE_LATENCY)
REQUESTS_PER_PREFERENCE = 2
ROUNDS = 2
NUM_PREDICT = 8
# A variant needs its file + KV cache + llama.cpp's 513 MiB compute graph, within 80 % of free memory: every
# quantized variant fits (Q8_0 ≈ 863 MiB / 0.8), F16 (≈ 1103 MiB / 0.8) does not, so QUALITY requests are
# downgraded and the substitutions panel has data too.
MEMORY_BUDGET = "1200MiB"
SCRAPE_INTERVAL_S = 1
# What Grafana's $__rate_interval is replaced with: several scrapes, and the traffic fits inside it.
RATE_INTERVAL = "1m"
STARTUP_TIMEOUT_S = 180
SETTLE_TIMEOUT_S = 30
VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def executable(name: str, hint: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {hint}", pytrace=False)
    return found


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def grafana_expr(expr: str) -> str:
    """The query Grafana sends with every variable on "All" (allValue `.*`)."""
    return VARIABLE.sub(lambda m: RATE_INTERVAL if m.group(1) == "__rate_interval" else ".*", expr)


def panel_queries(fleet: bool = False) -> list[tuple[str, str]]:
    """The node router's panels, or (`fleet`) the fleet row's, which test_fleet_dashboard_against_prometheus
    holds against a fleet router."""
    board = json.loads(DASHBOARD.read_text())
    return [(f"{panel['title']} / {target['refId']}", grafana_expr(target["expr"]))
            for panel in board["panels"] if panel["type"] != "row" for target in panel["targets"]
            if ("quantrouter_fleet_" in target["expr"]) == fleet]


def variable_selectors() -> list[tuple[str, str, str]]:
    """(variable, label, series selector) for each `label_values(selector, label)` variable."""
    board = json.loads(DASHBOARD.read_text())
    found = []
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            found.append((variable["name"], match.group(2), grafana_expr(match.group(1))))
    return found


def alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """`quantrouter serve --embedded` on free loopback ports, once its router service is SERVING."""
    command = executable("quantrouter", "make install (the embedded extra) and make prepare")
    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ,
           "QUANTROUTER_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
           "QUANTROUTER_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
           "QUANTROUTER_EMBEDDED_MEMORY_BUDGET": MEMORY_BUDGET}
    log = tmp_path_factory.mktemp("router") / "router.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([command, "serve", "--embedded"], env=env, stdout=sink, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{grpc_port}"
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=READY_SERVICE)
            settle(lambda: health.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING,
                   process, log, f"{READY_SERVICE} SERVING", STARTUP_TIMEOUT_S)
        yield target, metrics_port
    finally:
        stop(process)


@contextlib.contextmanager
def prometheus_scraping(targets: list[str], workdir: Path) -> Iterator[httpx.Client]:
    """Debian's Prometheus server on loopback scraping `targets` every second, with the alert rules loaded."""
    command = executable("prometheus", "make tools (Debian package prometheus)")
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "quantrouter", "static_configs": [{"targets": targets}]}],
    }))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [command, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            settle(lambda: client.get("/-/ready").status_code == 200, process, log, "Prometheus ready")
            settle(lambda: len(query(client, 'up{job="quantrouter"} == 1')) == len(targets), process, log,
                   "every target scraped")
            yield client
    finally:
        stop(process)


@pytest.fixture(scope="module")
def prometheus(router: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    _, metrics_port = router
    with prometheus_scraping([f"127.0.0.1:{metrics_port}"], tmp_path_factory.mktemp("prometheus")) as client:
        yield client


def settle(condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str,
           timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Until `condition` holds (a refused connection counts as not yet); fails with the log if `process` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"{Path(str(process.args[0])).name} exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.TransportError, grpc.RpcError):
            if condition():
                return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def query(client: httpx.Client, expr: str) -> list[dict[str, Any]]:
    response = client.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", f"{expr}\n→ {body.get('errorType')}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def generate(stub: router_service_pb2_grpc.RouterServiceStub, preference: int) -> None:
    request = router_service_pb2.GenerateRequest(
        model=FAMILY, prompt="The capital of France is", preference=preference,
        options=router_service_pb2.GenerationOptions(num_predict=NUM_PREDICT))
    events = [response.WhichOneof("event") for response in stub.Generate(request, timeout=120)]
    assert events[0] == "decision" and events[-1] == "completion", events


def wait_until_scraped(client: httpx.Client, counter: str, count: int) -> None:
    """Until Prometheus holds a sample of `counter` (summed) at `count` or more: a scrape after that traffic."""
    wait_for(lambda: query(client, f"sum({counter}) >= {count}"), SETTLE_TIMEOUT_S,
             f"Prometheus to see {count} in {counter}")


@pytest.fixture(scope="module")
def traffic(router: tuple[str, int], prometheus: httpx.Client) -> httpx.Client:
    """Requests with every preference in rounds, each round scraped before the next, so every counter has two
    samples apart and a rate. Returns once a scrape has seen all of it."""
    target, _ = router
    per_round = len(PREFERENCES) * REQUESTS_PER_PREFERENCE
    with grpc.insecure_channel(target) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        for sent in range(per_round, (ROUNDS + 1) * per_round, per_round):
            for preference in PREFERENCES:
                for _ in range(REQUESTS_PER_PREFERENCE):
                    generate(stub, preference)
            wait_until_scraped(prometheus, "quantrouter_requests_total", sent)
    return prometheus


@pytest.mark.parametrize(("panel", "expr"), panel_queries(), ids=[name for name, _ in panel_queries()])
def test_panel_query_returns_data(panel: str, expr: str, traffic: httpx.Client) -> None:
    result = query(traffic, expr)
    assert result, f"{panel}: no series for {expr}"
    values = [float(series["value"][1]) for series in result]
    assert any(math.isfinite(v) for v in values), f"{panel}: only NaN/Inf for {expr}: {values}"


@pytest.mark.parametrize(("variable", "label", "selector"), variable_selectors(),
                         ids=[name for name, _, _ in variable_selectors()])
def test_variable_has_values(variable: str, label: str, selector: str, traffic: httpx.Client) -> None:
    response = traffic.get(f"/api/v1/label/{label}/values", params={"match[]": selector})
    body = response.json()
    assert body["status"] == "success", body
    assert body["data"], f"{variable}: no values for {selector}"
    if variable == "model_name":
        assert FAMILY in body["data"]


@pytest.mark.parametrize(("alert", "expr"), alert_exprs(), ids=[name for name, _ in alert_exprs()])
def test_alert_expression_parses(alert: str, expr: str, traffic: httpx.Client) -> None:
    query(traffic, expr)


def test_prometheus_evaluates_every_rule_without_error(traffic: httpx.Client) -> None:
    scraped = time.time()  # the traffic has been scraped by now; Prometheus runs on this machine's clock

    def rules_evaluated_since() -> dict[str, Any]:
        groups = traffic.get("/api/v1/rules").json()["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        evaluated = [datetime.fromisoformat(rule["lastEvaluation"]).timestamp() for rule in rules.values()]
        return rules if all(at > scraped for at in evaluated) else {}

    rules = wait_for(rules_evaluated_since, SETTLE_TIMEOUT_S, "Prometheus to evaluate every rule after the traffic")
    assert set(rules) == {name for name, _ in alert_exprs()}
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
