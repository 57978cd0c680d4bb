"""The benchmarks' processes: the canned Ollama fixture, node and fleet routers (`quantrouter serve`), and
anything else started the same way (LiteLLM, Envoy, the Endpoint Picker).

Each runs in its own process, so its CPU time and memory (/proc) are its own and not the client's. Its
output goes to a log file, which the benchmark can read back. It is ready once that log matches a pattern
(group 1 is its address, group 2 its metrics port), and it gets SIGTERM on exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FLEET_READY", "ROUTER_READY", "SERVE", "SERVE_ARGUMENTS", "STOP_TIMEOUT_S", "Service", "canned_ollama",
           "fleet_router", "node_flags", "node_router", "router_env", "spawned"]

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
POLL_S = 0.05
# `quantrouter serve` on free ports: the CLI's arguments, which SERVE runs and bench.memory_probe takes as they are.
SERVE_ARGUMENTS = ("serve", "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0")
SERVE = ("-m", "quantrouter.cli", *SERVE_ARGUMENTS)
ROUTER_READY = r"quantrouter serving on port (\d+) \(metrics on (\d+)\)"
FLEET_READY = r"fleet router serving on port (\d+) \(metrics on (\d+)\)"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    pid: int
    address: str
    log: Path
    metrics: str = ""  # a router's metrics port


def router_env(settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """A benchmark's router's environment (`QUANTROUTER_*`): `settings`, over no memory reserve (the capacity a
    benchmark gives is what it routes over) and info logs (its ready line, and what a benchmark reads back)."""
    return {"QUANTROUTER_MEMORY_RESERVE": "0", "QUANTROUTER_LOG_LEVEL": "info", **(settings or {})}


@contextlib.contextmanager
def spawned(name: str, argv: Sequence[str], env: Mapping[str, str], ready: str, logs: Path) -> Iterator[Service]:
    """Start `argv`, wait until its output matches `ready` (group 1 is its address), SIGTERM it on exit."""
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (match := re.search(ready, log.read_text(errors="replace"))) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start (exit {process.poll()}):\n{log.read_text()[-2000:]}")
            time.sleep(POLL_S)
        yield Service(name, process.pid, match.group(1), log, match.group(2) if match.re.groups > 1 else "")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


def canned_ollama(name: str, tokens_per_second: float, logs: Path) -> contextlib.AbstractContextManager[Service]:
    """The canned Ollama fixture, each stream paced at `tokens_per_second` (0: as fast as it can write)."""
    return spawned(name, [sys.executable, "-m", "bench.fixtures.canned_ollama", "--port", "0",
                          "--tokens-per-second", str(tokens_per_second)], {}, r"(http://\S+)", logs)


def node_router(name: str, backend_url: str, logs: Path, env: Mapping[str, str], capacity: str | None = None,
                source: Path | None = None) -> contextlib.AbstractContextManager[Service]:
    """A node router in front of the Ollama API at `backend_url`: this checkout's, or the quantrouter package
    under `source` (a baseline); with a static GPU memory `capacity` when given."""
    argv = [sys.executable, *SERVE, "--ollama-host", backend_url]
    if capacity is not None:
        argv += ["--memory-capacity", capacity]
    return spawned(name, argv, {**env, "PYTHONPATH": str(source)} if source else env, ROUTER_READY, logs)


def fleet_router(name: str, nodes: Mapping[str, Service], logs: Path, env: Mapping[str, str]
                 ) -> contextlib.AbstractContextManager[Service]:
    """A fleet router over the node routers `nodes` (name → its service)."""
    return spawned(name, [sys.executable, *SERVE, *node_flags(nodes)], env, FLEET_READY, logs)


def node_flags(nodes: Mapping[str, Service]) -> list[str]:
    """`--node NAME=127.0.0.1:PORT` for each node router in `nodes` (name → its service)."""
    return [arg for node, router in nodes.items() for arg in ("--node", f"{node}=127.0.0.1:{router.address}")]
