"""Envoy's configuration in front of the picker, as one function: the tests, the benchmark and the
standalone deployment (deploy/overlays/gateway, checked against this in tests) all run the same config.

The model-server cluster sends each request where `x-gateway-destination-endpoint` says: an ORIGINAL_DST
cluster (any address, one per request), or, given the model servers, a cluster of them under Envoy's
override_host load-balancing policy, which takes the picker's whole list and tries the next endpoint on
a failed connection (the fallbacks). The ext_proc filter sends headers and both bodies
FULL_DUPLEX_STREAMED (fleet.md: llm-d's settings), plus the upstream address as an attribute, so the
picker learns which endpoint served the response when the gateway does not set
`x-gateway-destination-endpoint-served` itself.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DESTINATION", "envoy_config"]

# How long Envoy waits for the picker's answer to one message (a pick takes milliseconds).
MESSAGE_TIMEOUT = "5s"
CONNECT_TIMEOUT = "1s"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_OVERRIDE_HOST = "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost"
_ROUND_ROBIN = "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"
DESTINATION = "x-gateway-destination-endpoint"
# Retry only what failed before the request reached a model server: a generation is never run twice.
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _override_host(servers: list[tuple[str, int]], cluster_type: str) -> dict[str, Any]:
    policy = {"@type": _OVERRIDE_HOST, "override_host_sources": [{"header": DESTINATION}],
              "fallback_policy": {"policies": [{"typed_extension_config": {
                  "name": "envoy.load_balancing_policies.round_robin", "typed_config": {"@type": _ROUND_ROBIN}}}]}}
    return {"name": "model_servers", "type": cluster_type, "connect_timeout": CONNECT_TIMEOUT,
            "load_assignment": {"cluster_name": "model_servers", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _address(*server)}} for server in servers]}]},
            "load_balancing_policy": {"policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.override_host", "typed_config": policy}}]}}


def _clusters(picker: tuple[str, int] | None, model_servers: list[tuple[str, int]] | None,
              cluster_type: str) -> list[dict[str, Any]]:
    if picker is None:
        assert model_servers, "a round-robin Envoy needs its model servers"
        round_robin = {**_override_host(model_servers, cluster_type), "lb_policy": "ROUND_ROBIN"}
        del round_robin["load_balancing_policy"]
        return [round_robin]
    servers = _override_host(model_servers, cluster_type) if model_servers else {
        "name": "model_servers", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": CONNECT_TIMEOUT,
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION},
    }
    return [servers, {
        "name": "picker", "type": cluster_type, "connect_timeout": CONNECT_TIMEOUT,
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "picker", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _address(*picker)}}]}]},
    }]


def envoy_config(listen: tuple[str, int], picker: tuple[str, int] | None, admin: tuple[str, int], *,
                 model_servers: list[tuple[str, int]] | None = None, fallbacks: int = 0, fail_open: bool = False,
                 cluster_type: str = "STATIC") -> dict[str, Any]:
    """Envoy's bootstrap: a listener at `listen` routing through the picker at `picker` (FailOpen or FailClose),
    to any endpoint (ORIGINAL_DST) or, with `model_servers`, to those under override_host with `fallbacks`
    retries on connection failures. `cluster_type` STRICT_DNS lets a hostname stand for many servers. Without a
    picker, a plain round-robin Envoy over `model_servers` (the benchmark's baseline)."""
    ext_proc = {
        "grpc_service": {"envoy_grpc": {"cluster_name": "picker"}},
        "failure_mode_allow": fail_open,
        "message_timeout": MESSAGE_TIMEOUT,
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                            "request_body_mode": "FULL_DUPLEX_STREAMED",
                            "response_body_mode": "FULL_DUPLEX_STREAMED",
                            "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"},
        "metadata_options": {"forwarding_namespaces": {"untyped": ["envoy.lb", "envoy.lb.subset_hint"]}},
        "response_attributes": ["upstream.address"],
    }
    route: dict[str, Any] = {"cluster": "model_servers", "timeout": "0s"}
    if fallbacks:
        route["retry_policy"] = {"retry_on": RETRY_ON, "num_retries": fallbacks}
    filters = [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}]
    if picker is not None:
        filters.insert(0, {"name": "envoy.filters.http.ext_proc", "typed_config": {"@type": _EXT_PROC, **ext_proc}})
    manager = {
        "@type": _HCM, "stat_prefix": "inference", "codec_type": "AUTO",
        "route_config": {"name": "inference", "virtual_hosts": [{
            "name": "inference", "domains": ["*"],
            # No route timeout: a long generation streams for as long as it takes.
            "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
        "http_filters": filters,
    }
    return {
        "admin": {"address": _address(*admin)},
        "static_resources": {
            "listeners": [{"name": "inference", "address": _address(*listen),
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": manager}]}]}],
            "clusters": _clusters(picker, model_servers, cluster_type),
        },
    }


# The standalone deployment (deploy/overlays/gateway-standalone): Envoy on 8080 in the picker's pod, the nodes'
# Ollama servers found through their headless Service.
STANDALONE_NODES = "quantrouter-nodes.quantrouter.svc.cluster.local"
STANDALONE_FALLBACKS = 2


def standalone_config() -> dict[str, Any]:
    return envoy_config(("0.0.0.0", 8080), ("127.0.0.1", 9002), ("0.0.0.0", 9901),
                        model_servers=[(STANDALONE_NODES, 11434)], fallbacks=STANDALONE_FALLBACKS,
                        cluster_type="STRICT_DNS")
