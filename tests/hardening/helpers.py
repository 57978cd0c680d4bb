"""Helpers for the hardening tests: rich statuses, metrics, and an embedded backend in its own process.

The backend process is the real embedded llama.cpp server (`quantrouter embedded serve`), started with
subprocess so a test can kill it, freeze it (SIGSTOP) or start it late on a port chosen in advance.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from quantrouter.client import error_details
from quantrouter.server import RunningServer
from quantrouter.v1 import router_service_pb2 as pb

T = TypeVar("T")

BACKEND_START_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.05
PROMPT = "The capital of France is"
# A prompt for streams that must stay open: greedy (temperature 0, as `generate_request` asks), q4_0 answers
# it up to the length limit without an end of turn (2,027 tokens at num_ctx 2048, measured), so a test that
# holds such a stream ends it itself. Sampled at the default temperature it may end early.
LONG_PROMPT = "Count from 1 to 500, one number per line, with no other text."


def free_port() -> int:
    """A loopback port that was free a moment ago (for a backend that must start late on a known port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], T], timeout: float, what: str | Callable[[], str]) -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            described = what if isinstance(what, str) else what()
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {described}")
        time.sleep(POLL_INTERVAL_S)


@dataclass(frozen=True)
class Rich:
    """What a client sees of a failed call: code, message, ErrorInfo reason, RetryInfo delay, violations."""

    code: grpc.StatusCode
    message: str
    reason: str
    retry_delay: float | None
    fields: tuple[str, ...]


def rich(error: grpc.RpcError) -> Rich:
    details = error_details(error)
    return Rich(error.code(), error.details() or "", details.reason, details.retry_after,  # type: ignore[attr-defined]
                details.field_violations)


def sample(running: RunningServer, name: str, **labels: str) -> float:
    """A metric's current value from the router's registry (0 when the series does not exist yet)."""
    return running.registry.get_sample_value(name, labels) or 0.0


def total(running: RunningServer, name: str) -> float:
    """The sum of every series of a metric (e.g. the in-flight gauge over all families)."""
    return sum(s.value for m in running.registry.collect() for s in m.samples if s.name == name)


def generate_request(model: str, prompt: str = PROMPT, num_predict: int | None = 8, **fields: Any
                     ) -> pb.GenerateRequest:
    options = pb.GenerationOptions(temperature=0.0, seed=1)
    if num_predict is not None:
        options.num_predict = num_predict
    return pb.GenerateRequest(model=model, prompt=prompt, options=options, **fields)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


class BackendProcess:
    """`quantrouter embedded serve` in a child process, on a fixed loopback port."""

    def __init__(self, cache_dir: Path, port: int, *, max_queue: int = 8, memory_budget: str = "4GiB",
                 drain_seconds: float = 5.0) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._args = [sys.executable, "-m", "quantrouter.cli", "embedded", "serve", "--port", str(port),
                      "--cache-dir", str(cache_dir), "--max-queue", str(max_queue), "--memory-budget", memory_budget,
                      "--drain-seconds", str(drain_seconds)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, "QUANTROUTER_LOG_LEVEL": "warning"})
        wait_for(lambda: http_ok(self.url + "/") or self._died(), BACKEND_START_TIMEOUT_S, "the backend to listen")
        assert self.process.poll() is None, f"the backend exited with {self.process.returncode}"

    def _died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: the backend vanishes mid-whatever, as an OOM kill or a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextmanager
def backend_process(cache_dir: Path, port: int | None = None, **kwargs: Any) -> Iterator[BackendProcess]:
    backend = BackendProcess(cache_dir, port or free_port(), **kwargs)
    backend.start()
    try:
        yield backend
    finally:
        backend.stop()
