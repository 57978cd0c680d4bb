"""Assembly of a fleet router: the node set, discovery, the servicer, health, metrics, shutdown.

Stateless by design: it keeps nothing but the nodes' latest reports, so any number of replicas can
run behind one Service. Readiness follows the fleet: SERVING while at least one node is live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from quantrouter.background import service_in_thread
from quantrouter.client import ChannelOption, bearer_metadata
from quantrouter.config import Settings
from quantrouter.fleet.metrics import FleetMetrics
from quantrouter.fleet.nodes import NodeSet, NodeSettings
from quantrouter.fleet.router import FleetRouter
from quantrouter.fleet.service import FleetService
from quantrouter.metrics import Metrics
from quantrouter.server import DRAIN_POLL_S, WATCH_INTERVAL_S, listen, policy_config
from quantrouter.service import SERVICE_NAME, RequestReader
from quantrouter.tls import channel_credentials
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc

__all__ = ["FleetServer", "fleet_in_thread", "start_fleet"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
NODE_RECONNECT_BACKOFF_MS = 250
NODE_MAX_RECONNECT_BACKOFF_MS = 2000


@dataclass
class FleetServer:
    server: grpc.aio.Server
    port: int
    metrics_port: int
    router: FleetRouter
    health: Any
    registry: CollectorRegistry
    grace: float
    _stack: AsyncExitStack
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    draining: bool = False
    cut_short: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, then the relayed streams get `grace` seconds (or until `cut_short`), then stop."""
        if self.draining:
            return
        self.draining = True
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.grace if grace is None else grace)
        while self.router.in_flight and not self.cut_short.is_set() and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        await self.server.stop(0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stack.aclose()
        log.info("fleet router closed")


def node_settings(settings: Settings) -> NodeSettings:
    """How the fleet reaches its nodes: report cadence, channel options, bearer token and TLS."""
    fleet = settings.fleet
    options: tuple[ChannelOption, ...] = (
        ("grpc.max_receive_message_length", settings.limits.max_message_bytes),
        # A node that comes back is found within seconds, not after gRPC's default back-off of up to 2 min.
        ("grpc.initial_reconnect_backoff_ms", NODE_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", NODE_MAX_RECONNECT_BACKOFF_MS))
    if fleet.node_tls_server_name:
        options += (("grpc.ssl_target_name_override", fleet.node_tls_server_name),)
    credentials = (channel_credentials(fleet.node_tls_ca, fleet.node_tls_cert, fleet.node_tls_key)
                   if fleet.node_tls_ca is not None else None)
    return NodeSettings(fleet.report_interval, fleet.stale_after, options, bearer_metadata(fleet.auth_token),
                        credentials)


# More services on the fleet router's gRPC server, given its router and registry (the Endpoint Picker's).
AddServicers = Callable[[FleetRouter, CollectorRegistry, grpc.aio.Server], None]


def _no_more(router: FleetRouter, registry: CollectorRegistry, server: grpc.aio.Server) -> None:
    pass


async def start_fleet(settings: Settings, registry: CollectorRegistry | None = None,
                      add_servicers: AddServicers = _no_more) -> FleetServer:
    """Build and start a fleet router over `settings.fleet.nodes` (or what `settings.fleet.discover` finds)."""
    registry = registry if registry is not None else CollectorRegistry()
    stack = AsyncExitStack()
    try:
        metrics = Metrics(registry)  # the gRPC server metrics, shared names with a node router

        def rejected(node: str, reason: str) -> None:
            fleet_metrics.rejected_reports.labels(node, reason).inc()

        fleet = settings.fleet
        nodes = NodeSet(node_settings(settings), rejected)
        stack.push_async_callback(nodes.close)
        fleet_metrics = FleetMetrics(registry, nodes)
        router = FleetRouter(nodes, fleet_metrics, policy_config(settings.policy))
        running: FleetServer | None = None
        servicer = FleetService(router, RequestReader(settings.requests, settings.limits, router.resolve),
                                lambda: running is not None and running.draining)

        def add(server: grpc.aio.Server) -> None:
            pb_grpc.add_RouterServiceServicer_to_server(servicer, server)
            add_servicers(router, registry, server)

        listening = listen(settings, metrics, add, stack)
        tasks: list[asyncio.Task[None]] = []
        if fleet.discover:
            from quantrouter.fleet.discovery import follow_service
            tasks.append(asyncio.create_task(follow_service(
                fleet.discover, nodes.update, lambda error: fleet_metrics.discovery_errors.labels(error).inc())))
        else:
            nodes.update(fleet.nodes)
        await listening.health.set("", health_pb2.HealthCheckResponse.SERVING)

        # The fleet holds no variants of its own; its backends are the nodes, up while one is live.
        metrics.watch_variants(list, lambda: bool(nodes.live()))

        async def watch() -> None:
            while True:
                live = bool(nodes.live())
                await listening.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING if live
                                           else health_pb2.HealthCheckResponse.NOT_SERVING)
                await asyncio.sleep(WATCH_INTERVAL_S)

        tasks.append(asyncio.create_task(watch()))
        await listening.server.start()
        running = FleetServer(listening.server, listening.port, listening.metrics_port, router, listening.health,
                              registry, settings.server.grace_period, stack, tasks)
        log.info("quantrouter fleet router serving on port %d (metrics on %d) over %s", listening.port,
                 listening.metrics_port, fleet.discover or ", ".join(f"{k}={v}" for k, v in fleet.nodes.items()))
        return running
    except BaseException:
        await stack.aclose()
        raise


@contextlib.contextmanager
def fleet_in_thread(settings: Settings, registry: CollectorRegistry | None = None) -> Iterator[FleetServer]:
    """A fleet router on its own loop in a daemon thread (tests, benchmarks)."""
    with service_in_thread(lambda: start_fleet(settings, registry), lambda r: r.stop(grace=1.0),
                           name="quantrouter-fleet", start_timeout=START_TIMEOUT_S) as running:
        yield running
