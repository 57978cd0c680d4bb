"""The `gateway` and `gateway-standalone` overlays render and validate strictly; the InferencePool validates
against its CRD's openAPIV3Schema (jsonschema: kubernetes-validate knows no CRDs); the pieces point at each
other (pool → node pods and Ollama's port, picker Service → picker container, route → pool); the standalone
Envoy config is exactly what `envoy_config` writes, and Envoy itself accepts it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from quantrouter.config import load_settings
from quantrouter.fleet.discovery import parse_target
from quantrouter.gateway.envoy import STANDALONE_NODES, standalone_config
from quantrouter.gateway.server import HEALTH_SERVICES
from tests.deploy.conftest import DEPLOY, run_tool
from tests.deploy.test_fleet_overlay import KUBERNETES_VERSION, configmap, named, selects

# The GA InferencePool CRD of kubernetes-sigs/gateway-api-inference-extension (config/crd/bases), as released.
CRD = DEPLOY / "gateway" / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
Objects = list[dict[str, Any]]


def _render(tmp_path_factory: pytest.TempPathFactory, overlay: str) -> tuple[Path, Objects]:
    built = run_tool("kubectl", "kustomize", DEPLOY / "overlays" / overlay)
    assert built.returncode == 0, built.stderr
    path = tmp_path_factory.mktemp(overlay) / f"{overlay}.yaml"
    path.write_text(built.stdout)
    return path, [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Objects]:
    return _render(tmp_path_factory, "gateway")


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Objects]:
    return _render(tmp_path_factory, "gateway-standalone")


def _pool_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def test_both_overlays_validate_strictly(gateway: tuple[Path, Objects], standalone: tuple[Path, Objects]) -> None:
    for path, _ in (gateway, standalone):
        result = run_tool("kubernetes-validate", "--kubernetes-version", KUBERNETES_VERSION, "--strict", path)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_inference_pool_validates_against_its_crd_and_a_broken_one_does_not(
        gateway: tuple[Path, Objects]) -> None:
    schema = _pool_schema()
    pool = named(gateway[1], "InferencePool", "quantrouter-nodes")
    jsonschema.validate(pool, schema)
    broken = json.loads(json.dumps(pool))
    del broken["spec"]["targetPorts"]
    broken["spec"]["endpointPickerRef"]["failureMode"] = "FailSometimes"
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(broken))
    assert {e.validator for e in errors} >= {"required", "enum"}


def test_pool_picker_and_route_point_at_each_other(gateway: tuple[Path, Objects]) -> None:
    objects = gateway[1]
    pool = named(objects, "InferencePool", "quantrouter-nodes")["spec"]
    nodes = named(objects, "StatefulSet", "ollama")
    assert selects(pool["selector"]["matchLabels"], nodes)
    [ollama] = nodes["spec"]["template"]["spec"]["initContainers"]
    [port] = pool["targetPorts"]
    assert {"name": "http", "containerPort": port["number"]} in ollama["ports"]
    assert {"name": "OLLAMA_HOST", "value": f"0.0.0.0:{port['number']}"} in ollama["env"]
    picker_ref = pool["endpointPickerRef"]
    service = named(objects, "Service", picker_ref["name"])
    [service_port] = service["spec"]["ports"]
    assert service_port["port"] == picker_ref["port"]["number"] and picker_ref["failureMode"] == "FailClose"
    epp = named(objects, "Deployment", "quantrouter-epp")
    assert selects(service["spec"]["selector"], epp)
    container = _container(epp, "epp")
    assert container["args"] == ["epp"]
    assert {"name": service_port["targetPort"], "containerPort": 9002} in container["ports"]
    settings = load_settings(environ=configmap(objects, "quantrouter-epp-config"))
    assert settings.fleet.endpoint_port == port["number"] and settings.fleet.fallbacks > 0
    assert settings.server.grpc_address.endswith(":9002")
    target = parse_target(settings.fleet.discover)
    assert selects(named(objects, "Service", target.service)["spec"]["selector"], nodes)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["grpc"]["service"] in HEALTH_SERVICES
    binding = named(objects, "RoleBinding", "quantrouter-epp-endpointslices")
    assert binding["subjects"][0]["name"] == epp["spec"]["template"]["spec"]["serviceAccountName"]
    assert named(objects, "Role", binding["roleRef"]["name"])["rules"][0]["resources"] == ["endpointslices"]
    route = named(objects, "HTTPRoute", "quantrouter")["spec"]
    [rule] = route["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": "quantrouter-nodes"}]


def test_standalone_envoy_config_is_the_tested_one_and_envoy_accepts_it(standalone: tuple[Path, Objects],
                                                                      tmp_path: Path) -> None:
    objects = standalone[1]
    config = json.loads(configmap(objects, "quantrouter-envoy")["envoy.json"])
    assert config == standalone_config()
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    checked = run_tool("envoy", "--mode", "validate", "-c", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    epp = named(objects, "Deployment", "quantrouter-epp")
    picker = config["static_resources"]["clusters"][1]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    address = picker["endpoint"]["address"]["socket_address"]
    assert {"name": "QUANTROUTER_GRPC_ADDRESS", "value": f"{address['address']}:{address['port_value']}"} in \
        _container(epp, "epp")["env"]
    service, namespace = STANDALONE_NODES.split(".")[:2]
    assert named(objects, "Service", service)["metadata"]["namespace"] == namespace
    envoy = _container(epp, "envoy")
    gateway_service = named(objects, "Service", "quantrouter-gateway")
    assert selects(gateway_service["spec"]["selector"], epp)
    assert envoy["ports"] == [{"name": "http", "containerPort": 8080}]
