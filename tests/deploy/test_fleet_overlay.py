"""The `fleet` overlay renders, validates strictly, and wires what a fleet needs: node pods found through
a headless Service, fleet routers that may list and watch exactly its EndpointSlices, PDBs for both,
and settings each side accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from quantrouter.config import load_settings
from quantrouter.fleet.discovery import GRPC_PORT_NAME, SERVICE_NAME_LABEL, parse_target
from tests.deploy.conftest import DEPLOY, run_tool

KUBERNETES_VERSION = "1.34.0"
Objects = list[dict[str, Any]]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Objects]:
    built = run_tool("kubectl", "kustomize", DEPLOY / "overlays" / "fleet")
    assert built.returncode == 0, built.stderr
    path = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    path.write_text(built.stdout)
    return path, [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def named(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def configmap(objects: Objects, prefix: str) -> dict[str, str]:
    [found] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].rsplit("-", 1)[0] == prefix]
    data: dict[str, str] = found["data"]
    return data


def selects(selector: dict[str, str], pod: dict[str, Any]) -> bool:
    return selector.items() <= pod["spec"]["template"]["metadata"]["labels"].items()


def test_fleet_overlay_validates_strictly(rendered: tuple[Path, Objects]) -> None:
    result = run_tool("kubernetes-validate", "--kubernetes-version", KUBERNETES_VERSION, "--strict", rendered[0])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_fleet_discovers_the_node_pods_through_a_headless_service(rendered: tuple[Path, Objects]) -> None:
    objects = rendered[1]
    fleet = configmap(objects, "quantrouter-fleet-config")
    settings = load_settings(environ=fleet)
    target = parse_target(settings.fleet.discover)
    nodes = named(objects, "StatefulSet", "ollama")
    service = named(objects, "Service", target.service)
    assert target.namespace == service["metadata"]["namespace"] == nodes["metadata"]["namespace"]
    assert service["spec"]["clusterIP"] == "None" and nodes["spec"]["serviceName"] == target.service
    assert selects(service["spec"]["selector"], nodes)
    assert [p["name"] for p in service["spec"]["ports"]] == [GRPC_PORT_NAME]
    # The node routers are plain `serve` with their Ollama beside them; the fleet has no backend of its own.
    node_settings = load_settings(environ=configmap(objects, "quantrouter-config"))
    assert not node_settings.fleet.nodes and not node_settings.fleet.discover and node_settings.memory.capacity > 0
    assert settings.fleet.report_interval < settings.fleet.stale_after
    [ollama] = nodes["spec"]["template"]["spec"]["initContainers"]
    assert ollama["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert [t["metadata"]["name"] for t in nodes["spec"]["volumeClaimTemplates"]] == ["ollama-models"]
    assert SERVICE_NAME_LABEL == "kubernetes.io/service-name"  # what the EndpointSlice controller sets


def test_the_fleet_may_list_and_watch_endpointslices_and_nothing_more(rendered: tuple[Path, Objects]) -> None:
    objects = rendered[1]
    deployment = named(objects, "Deployment", "quantrouter-fleet")
    pod = deployment["spec"]["template"]["spec"]
    binding = named(objects, "RoleBinding", "quantrouter-fleet-endpointslices")
    role = named(objects, "Role", binding["roleRef"]["name"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": deployment["metadata"]["namespace"]}]
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["list", "watch"]}]
    assert pod["automountServiceAccountToken"] is True
    assert named(objects, "StatefulSet", "ollama")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_clients_reach_every_fleet_replica_and_disruptions_keep_one(rendered: tuple[Path, Objects]) -> None:
    objects = rendered[1]
    deployment = named(objects, "Deployment", "quantrouter-fleet")
    service = named(objects, "Service", "quantrouter-fleet")
    assert service["spec"]["clusterIP"] == "None" and selects(service["spec"]["selector"], deployment)
    assert deployment["spec"]["replicas"] >= 2
    fleet_pdb = named(objects, "PodDisruptionBudget", "quantrouter-fleet")
    assert fleet_pdb["spec"]["minAvailable"] == 1 and selects(fleet_pdb["spec"]["selector"]["matchLabels"],
                                                              deployment)
    node_pdb = named(objects, "PodDisruptionBudget", "quantrouter-nodes")
    assert node_pdb["spec"]["maxUnavailable"] == 1
    assert selects(node_pdb["spec"]["selector"]["matchLabels"], named(objects, "StatefulSet", "ollama"))
    assert not selects(node_pdb["spec"]["selector"]["matchLabels"], deployment)
    monitor = named(objects, "PodMonitor", "quantrouter")
    assert selects(monitor["spec"]["selector"]["matchLabels"], deployment)
    assert selects(monitor["spec"]["selector"]["matchLabels"], named(objects, "StatefulSet", "ollama"))
    grace = load_settings(environ=configmap(objects, "quantrouter-fleet-config")).server.grace_period
    router = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > \
        router["lifecycle"]["preStop"]["sleep"]["seconds"] + grace
