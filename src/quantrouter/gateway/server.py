"""Assembly of the Endpoint Picker: a fleet router (node reports, discovery, the RouterService API, metrics,
shutdown) whose gRPC server also serves Envoy's ext_proc, and gRPC health under the names the Gateway API
Inference Extension probes (`liveness`, `readiness`, the ext_proc service).

Readiness is SERVING from the start: with no live node the picker still answers, with a clear 503.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from quantrouter.background import service_in_thread
from quantrouter.config import Settings
from quantrouter.fleet.router import FleetRouter
from quantrouter.fleet.server import START_TIMEOUT_S, FleetServer, start_fleet
from quantrouter.gateway.extproc import EndpointPicker
from quantrouter.gateway.metrics import GatewayMetrics
from quantrouter.gateway.picker import Picker
from quantrouter.service import RequestReader

__all__ = ["HEALTH_SERVICES", "epp_in_thread", "start_epp"]

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("liveness", "readiness", EXT_PROC_SERVICE)


def _endpoint_of(settings: Settings, router: FleetRouter, node: str) -> str:
    """The node's model server: as configured, else its node router's host at `endpoint_port`."""
    if node in settings.fleet.endpoints:
        return settings.fleet.endpoints[node]
    known = router.nodes.nodes.get(node)
    host = known.address.rsplit(":", 1)[0] if known else node
    return f"{host}:{settings.fleet.endpoint_port}"


async def start_epp(settings: Settings, registry: CollectorRegistry | None = None) -> FleetServer:
    """Build and start the Endpoint Picker over `settings.fleet.nodes` (or what `settings.fleet.discover` finds)."""

    def add(router: FleetRouter, registry: CollectorRegistry, server: grpc.aio.Server) -> None:
        picker = Picker(router, RequestReader(settings.requests, settings.limits, router.resolve),
                        lambda node: _endpoint_of(settings, router, node), settings.limits.max_in_flight,
                        settings.fleet.fallbacks)
        servicer = EndpointPicker(picker, GatewayMetrics(registry), settings.limits.max_message_bytes)
        ext_grpc.add_ExternalProcessorServicer_to_server(servicer, server)

    running = await start_fleet(settings, registry, add)
    for name in HEALTH_SERVICES:
        await running.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return running


@contextlib.contextmanager
def epp_in_thread(settings: Settings, registry: CollectorRegistry | None = None) -> Iterator[FleetServer]:
    """An Endpoint Picker on its own loop in a daemon thread (tests, benchmarks)."""
    with service_in_thread(lambda: start_epp(settings, registry), lambda r: r.stop(grace=1.0),
                           name="quantrouter-epp", start_timeout=START_TIMEOUT_S) as running:
        yield running
