"""The relay against a real Ollama-protocol server over HTTP: the benchmark fixture bench.fixtures.canned_ollama,
which streams canned text as fast as asked (a stand-in for a model: the relay is what is tested here).

Proves: chunks that reached the router together leave as one piece (what makes one gRPC message carry many
tokens under load), the text and Ollama's final figures survive the batching for generate and chat, one
connection serves consecutive streams, and
`quantrouter serve --workers 2` runs two router processes that share one gRPC port and both take calls.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from bench.fixtures.canned_ollama import CANNED_TEXT, FAMILY, VARIANTS, CannedOllama, serve
from prometheus_client.parser import text_string_to_metric_families

from quantrouter.backend import Final, OllamaBackend, Text
from quantrouter.config import BackendSettings
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc

TAG = VARIANTS[-1].tag
TOKENS = 64
WORKERS = 2
CONNECTIONS = 16  # the kernel spreads connections over the workers: all on one has odds 2 ** -15
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.01


def expected_text(tokens: int) -> str:
    return "".join(CANNED_TEXT[i % len(CANNED_TEXT)] for i in range(tokens))


@pytest.fixture
async def fixture() -> CannedOllama:
    return CannedOllama()


@pytest.fixture
async def canned(fixture: CannedOllama) -> AsyncIterator[str]:
    runner, url = await serve(canned=fixture)
    try:
        yield url
    finally:
        await runner.cleanup()


@pytest.fixture
async def backend(canned: str) -> AsyncIterator[OllamaBackend]:
    client = OllamaBackend(BackendSettings(canned, connect_timeout=5.0, read_timeout=30.0, keep_alive="5m"))
    try:
        yield client
    finally:
        await client.close()


async def test_chunks_that_arrived_together_are_relayed_as_one_piece(fixture: CannedOllama,
                                                                    backend: OllamaBackend) -> None:
    """The consumer pauses after the first piece until the fixture has written every chunk (≈ 8 KiB, in the
    relay's socket by then: loopback delivers as it is written); all of them then come as few pieces."""
    pieces: list[str] = []
    finals: list[Final] = []
    stream = backend.generate(TAG, "Why is the sky blue?", "", {"num_predict": TOKENS})
    async for item in stream:
        if isinstance(item, Final):
            finals.append(item)
            continue
        pieces.append(item.text)
        if len(pieces) == 1:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                while not fixture.streams_written:
                    await asyncio.sleep(POLL_S)
    assert "".join(pieces) == expected_text(TOKENS)
    assert 2 <= len(pieces) <= 4, pieces  # one token first, then the rest in a read or three, not 63 messages
    assert len(finals) == 1 and finals[0].eval_count == TOKENS and finals[0].done_reason == "length"
    assert finals[0].eval_duration > 0 and finals[0].total_duration >= finals[0].eval_duration


async def test_chat_text_and_final_figures_survive_the_batching(backend: OllamaBackend) -> None:
    items = [item async for item in backend.chat(TAG, [{"role": "user", "content": "Hi"}], {"num_predict": 7})]
    *texts, final = items
    assert "".join(t.text for t in texts if isinstance(t, Text)) == expected_text(7)
    assert sum(t.chunks for t in texts if isinstance(t, Text)) == 7  # one chunk a token, however they were joined
    assert isinstance(final, Final) and final.eval_count == 7 and final.prompt_eval_count >= 1


def connections_to(port: int) -> int:
    """TCP connections (any state, TIME_WAIT included) to a loopback port, from /proc/net/tcp (proc(5))."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[2].endswith(f":{port:04X}"))


async def test_consecutive_streams_reuse_one_connection(canned: str, backend: OllamaBackend) -> None:
    """The relay reads each body to its end after the final chunk, so the pool keeps the connection: a new
    TCP connection per request would put a connect and an accept in every time to first token."""
    for _ in range(10):
        items = [item async for item in backend.generate(TAG, "Hi", "", {"num_predict": 2})]
        assert isinstance(items[-1], Final)
    assert connections_to(int(canned.rsplit(":", 1)[1])) == 1



def metrics_total(port: int, name: str) -> float:
    """The sum of a metric's series in a worker's `/metrics`, read with prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def canned_process(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = tmp_path / "canned.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "bench.fixtures.canned_ollama", "--port", "0"], stdout=out)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not log.read_text().strip():
        assert process.poll() is None and time.monotonic() < deadline, "the canned backend did not start"
        time.sleep(0.05)
    return process, log.read_text().strip()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, list[int]]]:
    """`quantrouter serve --workers 2` on ports of its own choosing, in front of the canned backend.

    Metrics port 0 lets each worker take a free port of its own and log it: a fixed base port + i would race
    with whatever else takes an ephemeral port meanwhile (CI once found base + 1 in use)."""
    canned, url = canned_process(tmp_path)
    log = tmp_path / "router.log"
    with log.open("wb") as out:
        router = subprocess.Popen(
            [sys.executable, "-m", "quantrouter.cli", "serve", "--workers", str(WORKERS), "--ollama-host", url,
             "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
             "--memory-capacity", "80GiB"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(lines := [line for line in log.read_text().splitlines() if "quantrouter serving on port" in line]
                  ) < WORKERS:
            assert router.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        ports = {line.split("serving on port ")[1].split()[0] for line in lines}
        assert len(ports) == 1, f"the workers serve on different ports: {ports}"
        metrics_ports = [int(line.split("(metrics on ")[1].split(")")[0]) for line in lines]
        yield router, int(ports.pop()), metrics_ports
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(STOP_TIMEOUT_S)
        canned.terminate()
        canned.wait(STOP_TIMEOUT_S)


def test_workers_share_one_port_and_both_take_calls(workers: tuple[subprocess.Popen[bytes], int, list[int]]) -> None:
    router, port, metrics_ports = workers
    request = pb.GenerateRequest(model=FAMILY, prompt="Hi", options=pb.GenerationOptions(num_predict=4))
    for _ in range(CONNECTIONS):  # a channel each: a new TCP connection, which the kernel places on a worker
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            responses = list(pb_grpc.RouterServiceStub(channel).Generate(request, timeout=30))
            assert responses[-1].completion.generated_tokens == 4
    served = [metrics_total(metrics_port, "quantrouter_requests_total") for metrics_port in metrics_ports]
    assert sum(served) == CONNECTIONS and all(served), served
    router.send_signal(signal.SIGTERM)
    assert router.wait(STOP_TIMEOUT_S) == 0
    assert not [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if Path(f"/proc/{pid}/stat").exists() and _parent_of(pid) == router.pid]


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0


def test_workers_refuse_the_embedded_backend() -> None:
    result = subprocess.run([sys.executable, "-m", "quantrouter.cli", "serve", "--workers", "2", "--embedded"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--workers" in result.stderr and "quantrouter embedded serve" in result.stderr



async def test_every_backend_call_goes_straight_to_the_host_whatever_the_proxy_variables_say(
        canned: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment that nothing answers: catalog calls and streams alike never try it."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # discard: a connection there is refused
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    backend = OllamaBackend(BackendSettings(canned, connect_timeout=5.0, read_timeout=30.0, keep_alive="5m"))
    try:
        listed = await backend.list_models()
        items = [item async for item in backend.generate(TAG, "Hello", "", {"num_predict": 4})]
    finally:
        await backend.close()
    assert TAG in {model.tag for model in listed}
    assert "".join(item.text for item in items if isinstance(item, Text)) == expected_text(4)
