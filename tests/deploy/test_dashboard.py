"""The Grafana dashboard follows grafana/dashboard-linter's rules (docs/conventions.md §5) and every
query reads metrics that `quantrouter.metrics.Metrics` exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "quantrouter-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = re.compile(r"\b(?:rate|irate|increase)\s*\(")
# One metric per panel the issue names; each must be charted somewhere.
REQUIRED_METRICS = {
    "quantrouter_requests_total", "quantrouter_route_decisions_total",
    "quantrouter_delivered_tokens_per_second_bucket", "quantrouter_time_to_first_token_seconds_bucket",
    "quantrouter_request_duration_seconds_bucket", "quantrouter_route_substitutions_total",
    "quantrouter_gpu_memory_free_bytes", "quantrouter_gpu_memory_total_bytes",
    "quantrouter_variant_resident", "quantrouter_variant_vram_bytes", "quantrouter_in_flight_requests",
    "quantrouter_decision_duration_seconds_bucket", "quantrouter_backend_up",
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def test_metric_name_parser_sees_through_promql(promql_metric_names: Any) -> None:
    """The helper the checks below rely on: selectors, ranges, modifiers and functions are not names."""
    expr = ('histogram_quantile(0.5, sum by (le) (rate(a_bucket{x="y{z}"}[$__rate_interval])))\n'
            '/ on (p) group_left b_total offset 5m > bool 1e3 and c')
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert promql_metric_names('label_values(d_total{m=~"$model_name"}, target_model_name)') == {"d_total"}


def test_one_datasource_variable_of_prometheus() -> None:
    datasources = [v for v in variables().values() if v["type"] == "datasource"]
    assert len(datasources) == 1
    assert datasources[0]["name"] == "datasource"
    assert datasources[0]["label"] == "Data Source"
    assert datasources[0]["query"] == "prometheus"


@pytest.mark.parametrize("name", ["model_name", "target_model_name"])
def test_family_and_variant_variables(name: str, exported: set[str], promql_metric_names: Any) -> None:
    variable = variables()[name]
    assert variable["type"] == "query"
    assert variable["datasource"] == DATASOURCE
    assert variable["includeAll"] and variable["allValue"] == ".*"
    assert variable["definition"] == variable["query"]["query"]
    assert promql_metric_names(variable["definition"]) <= exported
    assert re.search(rf",\s*{name}\s*\)$", variable["definition"])


def test_dashboard_as_code_basics() -> None:
    board = dashboard()
    assert board["uid"] and board["editable"] is False
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("panel", panels(), ids=lambda panel: panel["title"])
def test_panel_has_unit_and_uses_the_datasource_variable(panel: dict[str, Any]) -> None:
    assert panel["fieldConfig"]["defaults"]["unit"], "every panel needs a unit"
    assert panel["datasource"] == DATASOURCE
    assert panel["targets"]
    for target in panel["targets"]:
        assert target["datasource"] == DATASOURCE


@pytest.mark.parametrize("expr", queries())
def test_rates_use_rate_interval(expr: str) -> None:
    for match in RATE.finditer(expr):
        assert expr[match.end():].split(")", 1)[0].endswith("[$__rate_interval]"), expr


@pytest.mark.parametrize("expr", queries())
def test_query_reads_only_exported_metrics(expr: str, exported: set[str], promql_metric_names: Any) -> None:
    names = promql_metric_names(expr)
    assert names, f"no metric found in {expr!r}"
    assert names <= exported, f"not exported by quantrouter.metrics: {sorted(names - exported)}"


def test_every_required_panel_metric_is_charted(promql_metric_names: Any) -> None:
    charted = set().union(*(promql_metric_names(expr) for expr in queries()))
    assert charted >= REQUIRED_METRICS, f"no panel for {sorted(REQUIRED_METRICS - charted)}"
