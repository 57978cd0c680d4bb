"""Graceful shutdown of `quantrouter serve` as a real process, the way Kubernetes stops a pod.

SIGTERM: readiness goes NOT_SERVING, new streams are refused, the stream in flight finishes, exit 0.
A second SIGTERM cancels what remains at once, and the process still exits cleanly.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quantrouter.embedded import EmbeddedServer
from quantrouter.service import SERVICE_NAME
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from tests.hardening.helpers import LONG_PROMPT, generate_request, wait_for
from tests.support import FAMILY

START_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
GRACE_S = 60.0  # long, so that an exit well before it proves the stream (not the clock) ended the drain
CUT_SHORT_S = 10.0
Q4 = f"{FAMILY}-q4_0"
_SERVING_ON = re.compile(r"quantrouter serving on port (\d+)")


@dataclass
class Served:
    process: subprocess.Popen[str]
    target: str
    log: list[str]
    reader: threading.Thread  # fills `log` until the process's stderr closes


@pytest.fixture
def served(embedded_backend: EmbeddedServer) -> Iterator[Served]:
    env = {**os.environ, "QUANTROUTER_GRACE_PERIOD": str(GRACE_S), "QUANTROUTER_MEMORY_CAPACITY": "4GiB",
           "QUANTROUTER_MEMORY_RESERVE": "0", "QUANTROUTER_LOG_LEVEL": "info", "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "quantrouter.cli", "serve", "--grpc-address", "127.0.0.1:0",
         "--metrics-address", "127.0.0.1:0", "--ollama-host", embedded_backend.url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        port = None
        while port is None:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if match := _SERVING_ON.search(line):
                port = int(match.group(1))
        target = f"127.0.0.1:{port}"
        wait_for(lambda: ready(target), START_TIMEOUT_S, "the router to be ready")
        yield Served(process, target, log, reader)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(EXIT_TIMEOUT_S)
        reader.join(EXIT_TIMEOUT_S)
        assert process.stderr is not None
        process.stderr.close()


def exit_code(served: Served, timeout: float = EXIT_TIMEOUT_S) -> int:
    """The process's exit status; if it hangs, every thread's stack (faulthandler) and its log in the failure."""
    try:
        return served.process.wait(timeout)
    except subprocess.TimeoutExpired:
        served.process.send_signal(signal.SIGABRT)
        served.process.wait(EXIT_TIMEOUT_S)
        served.reader.join(EXIT_TIMEOUT_S)  # the dump is all in once stderr closes
        log = "".join(served.log[-200:])
        raise AssertionError(f"quantrouter serve did not exit within {timeout:.0f} s:\n{log}") from None


def ready(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                           timeout=5).status
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


def test_sigterm_drains_the_stream_in_flight_then_exits_zero(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.RouterServiceStub(channel)
        stream = stub.Generate(generate_request(Q4, num_predict=48))
        assert next(stream).HasField("decision")
        assert next(stream).HasField("chunk")

        served.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # a watcher is a stream too: it would hold the drain open until the grace ends
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Generate(generate_request(Q4), timeout=EXIT_TIMEOUT_S))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

        rest = list(stream)
        assert rest[-1].HasField("completion"), "the stream in flight did not finish"
        assert rest[-1].completion.generated_tokens > 0
    assert exit_code(served) == 0
    assert any("shutting down" in line for line in served.log)


def test_second_sigterm_cancels_what_remains(served: Served, embedded_backend: EmbeddedServer) -> None:
    with grpc.insecure_channel(served.target) as channel:
        stream = pb_grpc.RouterServiceStub(channel).Generate(generate_request(Q4, prompt=LONG_PROMPT,
                                                                              num_predict=4000))
        assert next(stream).HasField("decision")
        assert next(stream).HasField("chunk")
        served.process.send_signal(signal.SIGTERM)
        assert next(stream).HasField("chunk"), "the first SIGTERM must let the stream go on"
        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as raised:
            list(stream)
        assert raised.value.code() in (grpc.StatusCode.CANCELLED,  # type: ignore[attr-defined]
                                       grpc.StatusCode.UNAVAILABLE)
        assert time.monotonic() - started < CUT_SHORT_S, "the second SIGTERM must cut the stream at once"
    assert exit_code(served, CUT_SHORT_S) == 0
    assert time.monotonic() - started < CUT_SHORT_S
    assert any("second signal" in line for line in served.log)
    wait_for(lambda: not any(m.busy for m in embedded_backend.resident()), CUT_SHORT_S,
             "the backend to stop generating for the cancelled stream")
