"""Every overlay renders with `kubectl kustomize`, validates against the Kubernetes schemas in strict
mode, and has the shape docs/conventions.md §4 asks for. CRDs (PodMonitor, PrometheusRule) have
no bundled schema, so their fields are checked here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from quantrouter.config import SETTING_KEYS, load_settings, parse_duration

# The oldest Kubernetes the manifests need: resource.k8s.io/v1 (DRA) and the preStop sleep action are
# GA in 1.34, native sidecars since 1.33.
KUBERNETES_VERSION = "1.34.0"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
READY_SERVICE = "quantrouter.v1.RouterService"
GRPC_PORT = 50051
METRICS_PORT = 9464
OVERLAYS = ("default", "dra", "cpu")

Objects = list[dict[str, Any]]


def one(objects: Objects, kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objects: Objects) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def router(objects: Objects) -> dict[str, Any]:
    return next(c for c in pod_spec(objects)["containers"] if c["name"] == "quantrouter")


def config(objects: Objects) -> dict[str, str]:
    configmaps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(
        "quantrouter-config")]
    assert len(configmaps) == 1
    return configmaps[0]["data"]


def gpu_limits(objects: Objects) -> list[str]:
    spec = pod_spec(objects)
    return [c["name"] for c in spec.get("initContainers", []) + spec["containers"]
            if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str, rendered: Any, tool: Any) -> None:
    path, _ = rendered[overlay]
    result = tool("kubernetes-validate", "--kubernetes-version", KUBERNETES_VERSION, "--strict", path)
    assert result.returncode == 0, f"{overlay}: kubernetes-validate failed:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_is_settings_the_router_accepts(overlay: str, rendered: Any) -> None:
    data = config(rendered[overlay][1])
    fields = {f"QUANTROUTER_{name.upper()}" for name in SETTING_KEYS}
    assert set(data) <= fields, f"unknown settings: {sorted(set(data) - fields)}"
    settings = load_settings(environ=data)
    server = settings.server
    assert server.grpc_address.endswith(f":{GRPC_PORT}") and not server.grpc_address.startswith("127.")
    assert server.metrics_address.endswith(f":{METRICS_PORT}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_restricted_with_read_only_root(overlay: str, rendered: Any) -> None:
    spec = pod_spec(rendered[overlay][1])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["securityContext"]["runAsUser"] > 0
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec.get("initContainers", []) + spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]
    tmp = next(m for m in router(rendered[overlay][1])["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_probes_use_grpc_health(overlay: str, rendered: Any) -> None:
    container = router(rendered[overlay][1])
    assert container["livenessProbe"]["grpc"] == {"port": GRPC_PORT, "service": ""}
    assert container["readinessProbe"]["grpc"] == {"port": GRPC_PORT, "service": READY_SERVICE}
    assert container["startupProbe"]["grpc"]["port"] == GRPC_PORT
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_outlasts_the_drain(overlay: str, rendered: Any) -> None:
    objects = rendered[overlay][1]
    grace = parse_duration(config(objects)["QUANTROUTER_GRACE_PERIOD"])
    pre_stop = router(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod_spec(objects)["terminationGracePeriodSeconds"] > pre_stop + grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_and_podmonitor_select_the_pod(overlay: str, rendered: Any) -> None:
    objects = rendered[overlay][1]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"}]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # 0 would block every node drain of a single-replica GPU pod (conventions.md §4).
    assert pdb["spec"]["maxUnavailable"] >= 1
    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_is_labelled_for_grafana(overlay: str, rendered: Any) -> None:
    dashboards = [o for o in rendered[overlay][1]
                  if o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert [d["metadata"]["name"] for d in dashboards] == ["quantrouter-dashboard"]
    shipped = json.loads(dashboards[0]["data"]["quantrouter-dashboard.json"])
    assert shipped == json.loads((DEPLOY / "grafana" / "quantrouter-dashboard.json").read_text())


def test_default_gives_the_gpu_to_an_ollama_sidecar_and_a_static_capacity(rendered: Any) -> None:
    objects = rendered["default"][1]
    [ollama] = pod_spec(objects)["initContainers"]
    assert ollama["name"] == "ollama" and ollama["restartPolicy"] == "Always"
    assert ollama["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_limits(objects) == ["ollama"]
    env = {e["name"]: e["value"] for e in ollama["env"]}
    settings = load_settings(environ=config(objects))
    assert settings.backend.host == f"http://{env['OLLAMA_HOST']}"
    assert env["OLLAMA_HOST"].startswith("127.0.0.1:")
    assert settings.memory.capacity > 0
    claim = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "ollama-data")
    assert claim["persistentVolumeClaim"]["claimName"] == one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    assert next(m for m in ollama["volumeMounts"] if m["name"] == "ollama-data")["mountPath"] in env["OLLAMA_MODELS"]


def test_dra_shares_one_claim_between_both_containers(rendered: Any) -> None:
    objects = rendered["dra"][1]
    template = one(objects, "ResourceClaimTemplate")
    assert template["apiVersion"] == "resource.k8s.io/v1"
    [request] = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["deviceClassName"] == "gpu.nvidia.com"
    assert request["exactly"]["count"] == 1
    spec = pod_spec(objects)
    [claim] = spec["resourceClaims"]
    assert claim["resourceClaimTemplateName"] == template["metadata"]["name"]
    for container in spec["initContainers"] + spec["containers"]:
        assert container["resources"]["claims"] == [{"name": claim["name"]}], container["name"]
    assert gpu_limits(objects) == []
    # No static capacity: the router reads free memory from NVML through the shared device.
    assert load_settings(environ=config(objects)).memory.capacity == 0


def test_cpu_runs_the_embedded_backend_without_gpu_or_ollama(rendered: Any) -> None:
    objects = rendered["cpu"][1]
    spec = pod_spec(objects)
    assert gpu_limits(objects) == []
    assert "ollama" not in {c["name"] for c in spec.get("initContainers", []) + spec["containers"]}
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    settings = load_settings(environ=config(objects))
    assert settings.embedded.enabled is True
    assert router(objects)["image"].endswith("-embedded")
    volumes = {v["name"]: v for v in spec["volumes"]}
    cache = next(m for m in router(objects)["volumeMounts"] if m["mountPath"] == str(settings.embedded.cache_dir))
    assert "emptyDir" in volumes[cache["name"]]
