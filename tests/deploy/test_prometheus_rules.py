"""The alert rules: promtool accepts them and their unit tests pass, the PrometheusRule in the kustomize
base carries exactly the same groups, and every expression reads metrics the router exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = PROMETHEUS / "quantrouter-rules.yaml"
PROMETHEUS_RULE = PROMETHEUS.parent / "base" / "prometheusrule.yaml"
EXPECTED_ALERTS = {"QuantrouterBackendDown", "QuantrouterErrorRatioHigh", "QuantrouterNoVariantFits",
                   "QuantrouterTokensPerSecondCollapse", "QuantrouterGpuMemoryNearlyFull", "QuantrouterFleetNodeStale",
                   "QuantrouterFleetNodeReportsRejected"}


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules(tool: Any) -> None:
    result = tool("promtool", "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests(tool: Any) -> None:
    result = tool("promtool", "test", "rules", RULES.with_suffix(".test.yaml"), cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rule_matches_the_plain_rules_file() -> None:
    resource = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"] == yaml.safe_load(RULES.read_text()), (
        f"{PROMETHEUS_RULE} drifted from {RULES}: copy the groups across")


def test_the_alerts_the_issue_asks_for_exist() -> None:
    assert {rule["alert"] for rule in alerts()} == EXPECTED_ALERTS


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_alert_has_for_severity_and_annotations(rule: dict[str, Any]) -> None:
    assert rule["for"], "without `for:` a single bad scrape pages someone"
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_alert_reads_only_exported_metrics(rule: dict[str, Any], exported: set[str],
                                           promql_metric_names: Any) -> None:
    names = promql_metric_names(rule["expr"])
    assert names, f"no metric found in {rule['expr']!r}"
    assert names <= exported, f"not exported by quantrouter.metrics: {sorted(names - exported)}"
