"""Backend faults injected for real: a backend process that is absent, killed or frozen; a full queue;
a variant that cannot load; NVML failing at runtime (the only stand-in, see `FlakyNvml`).

The client always gets a clean gRPC status with an ErrorInfo reason, fast, and nothing stays counted
as in flight.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import ollama
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from quantrouter.config import Settings, load_settings, with_keys
from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, run_embedded_in_thread
from quantrouter.server import RunningServer, run_in_thread
from quantrouter.service import SERVICE_NAME
from quantrouter.units import GiB, MiB
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from tests.hardening.helpers import (
    LONG_PROMPT,
    Rich,
    backend_process,
    free_port,
    generate_request,
    rich,
    sample,
    total,
    wait_for,
)
from tests.support import FAMILY, router_settings, scrape

# Bounds a hang, never the speed being tested: a fallback's cold load plus a few tokens took over 30 s
# with the two cores shared by five suites.
TIMEOUT_S = 60.0
# "Fast" for a refused or broken backend: well under any client deadline worth setting, and half the
# frozen test's 10 s read timeout, so "fast" and "waited for the read timeout" stay apart even when the
# two cores are shared with other suites (milliseconds on a quiet machine).
FAST_S = 3.0
RECOVERY_TIMEOUT_S = 20.0
# Fits every quantized variant (Q8_0 ≈ 863 MiB at num_ctx 4096, compute graph included) but never F16
# (≈ 1103 MiB): the backend refuses to load it.
SMALL_BUDGET = 1000 * MiB
F16 = f"{FAMILY}-f16"
Q8 = f"{FAMILY}-q8_0"
Q4 = f"{FAMILY}-q4_0"
Q3 = f"{FAMILY}-q3_K_M"


def settings_for(url: str, **overrides: Any) -> Settings:
    return load_settings({"grpc_address": "127.0.0.1:0", "metrics_address": "127.0.0.1:0", "ollama_host": url,
                          "memory_capacity": 4 * GiB, "memory_reserve": 0, "ps_refresh_interval": 0.2, **overrides}, {})


def health(target: str, service: str) -> Any:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=TIMEOUT_S).status


def load(url: str, tag: str, num_ctx: int) -> None:
    """Ollama's load-only request (an empty prompt), straight to the backend."""
    body = json.dumps({"model": tag, "options": {"num_ctx": num_ctx}}).encode()
    request = urllib.request.Request(f"{url}/api/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        assert json.loads(response.read())["done_reason"] == "load"


def assert_nothing_in_flight(running: RunningServer) -> None:
    # A leaked slot never returns, so the wait only bounds a hang (FAST_S was a guess at a loaded box's speed).
    wait_for(lambda: running.router.in_flight == 0 and total(running, "quantrouter_in_flight_requests") == 0,
             TIMEOUT_S, "the in-flight count to return to zero")


def refused_fast(stub: pb_grpc.RouterServiceStub, request: pb.GenerateRequest, timeout: float | None = TIMEOUT_S
                 ) -> Rich:
    """What the client sees of a call that must fail, and fail within FAST_S."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request, timeout=timeout))
    assert time.monotonic() - started < FAST_S
    return rich(raised.value)


def collect(stub: pb_grpc.RouterServiceStub, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    responses = list(stub.Generate(request, timeout=TIMEOUT_S))
    assert responses[-1].HasField("completion"), "the stream ended without a completion"
    return responses


def test_backend_down_at_start_then_recovers_by_itself(cache_dir: Path) -> None:
    port = free_port()
    with run_in_thread(settings_for(f"http://127.0.0.1:{port}"), CollectorRegistry()) as running:
        target = f"127.0.0.1:{running.port}"
        assert health(target, "") == health_pb2.HealthCheckResponse.SERVING  # alive
        assert health(target, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING  # not ready
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RouterServiceStub(channel)
            seen = refused_fast(stub, generate_request(FAMILY))
            assert (seen.code, seen.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
            assert "unreachable" in seen.message
            assert sample(running, "quantrouter_backend_up") == 0
            with backend_process(cache_dir, port):
                wait_for(lambda: health(target, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING,
                         RECOVERY_TIMEOUT_S, "readiness to come back with the backend")
                responses = collect(stub, generate_request(FAMILY))
                assert responses[0].decision.variant.startswith(FAMILY)
                assert sample(running, "quantrouter_backend_up") == 1


def test_backend_killed_mid_stream_ends_the_stream_cleanly(cache_dir: Path) -> None:
    with backend_process(cache_dir) as backend, \
            run_in_thread(settings_for(backend.url), CollectorRegistry()) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        call = stub.Generate(generate_request(Q4, prompt=LONG_PROMPT, num_predict=2000), timeout=TIMEOUT_S)
        assert next(call).HasField("decision")
        assert next(call).HasField("chunk")
        backend.kill()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            list(call)
        assert time.monotonic() - started < FAST_S
        seen = rich(raised.value)
        assert (seen.code, seen.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_FAILED")
        assert "broke" in seen.message
        assert_nothing_in_flight(running)
        wait_for(lambda: health(f"127.0.0.1:{running.port}", SERVICE_NAME)
                 == health_pb2.HealthCheckResponse.NOT_SERVING, RECOVERY_TIMEOUT_S, "readiness to drop")
        assert sample(running, "quantrouter_requests_total", model_name=FAMILY, target_model_name=Q4,
                      quantization="Q4_0", preference="balanced", code="UNAVAILABLE") == 1


def test_frozen_backend_hits_the_read_timeout_and_the_client_deadline(cache_dir: Path) -> None:
    """Row "Ollama slow / frozen": SIGSTOP keeps the backend's socket open but silent, the slowest backend
    there is. A client deadline shorter than the read timeout ends the call first and is not the variant's
    fault; the read timeout is DEADLINE_EXCEEDED `BACKEND_TIMEOUT` and counts a breaker failure (with
    `breaker_failures` 1, that failure opens it)."""
    read_timeout = 10.0  # the warm-up generation must not hit it on two shared cores (6 s did)
    cooldown = 2.0
    settings = settings_for("", backend_read_timeout=read_timeout, breaker_failures=1, breaker_cooldown=cooldown)
    with backend_process(cache_dir) as backend, \
            run_in_thread(with_keys(settings, {"ollama_host": backend.url}), CollectorRegistry()) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        load(backend.url, Q4, settings.requests.num_ctx)  # a cold load may take longer than this short read timeout
        stub = pb_grpc.RouterServiceStub(channel)
        collect(stub, generate_request(Q4))
        backend.signal(signal.SIGSTOP)
        try:
            # Before the read timeout, yet long enough that the policy, pricing one token at the speeds it
            # measured (slow on a loaded machine), still expects it to fit rather than refusing up front.
            client_deadline = 4.5
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.Generate(generate_request(Q4, num_predict=1), timeout=client_deadline))
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            assert time.monotonic() - started < client_deadline + FAST_S
            assert not running.router.breaker.is_open(Q4, time.monotonic()), "a client's deadline counted"

            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.Generate(generate_request(Q4), timeout=TIMEOUT_S))
            waited = time.monotonic() - started
            seen = rich(raised.value)
            assert (seen.code, seen.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "BACKEND_TIMEOUT")
            assert read_timeout <= waited < read_timeout + FAST_S
            assert sample(running, "quantrouter_breaker_trips_total", model_name=FAMILY, target_model_name=Q4) == 1
            assert_nothing_in_flight(running)
        finally:
            backend.signal(signal.SIGCONT)
        wait_for(lambda: not running.router.breaker.is_open(Q4, time.monotonic()), cooldown + FAST_S,
                 "the cool-down to end")
        collect(stub, generate_request(Q4))  # thawed, it serves again


def test_backend_unreachable_later_keeps_the_catalog(cache_dir: Path) -> None:
    """Row "Ollama unreachable later": UNAVAILABLE `BACKEND_UNAVAILABLE` at once; the last catalog stays
    (Route still decides, ListVariants still lists); readiness drops; no breaker counts it."""
    with backend_process(cache_dir) as backend, \
            run_in_thread(settings_for(backend.url, breaker_failures=1), CollectorRegistry()) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        collect(stub, generate_request(Q4))
        backend.kill()
        wait_for(lambda: health(f"127.0.0.1:{running.port}", SERVICE_NAME)
                 == health_pb2.HealthCheckResponse.NOT_SERVING, RECOVERY_TIMEOUT_S, "readiness to drop")
        # The family request sets no deadline: with the backend gone the router priced 8 tokens at minutes
        # here and refused a 30 s deadline up front (FAILED_PRECONDITION); this row is about reaching Ollama.
        for request, deadline in ((generate_request(Q4), TIMEOUT_S), (generate_request(Q4), TIMEOUT_S),
                                  (generate_request(FAMILY), None)):
            seen = refused_fast(stub, request, deadline)
            assert (seen.code, seen.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
        assert stub.Route(pb.RouteRequest(model=FAMILY)).decision.variant.startswith(FAMILY)
        listing = stub.ListVariants(pb.ListVariantsRequest(), timeout=TIMEOUT_S)
        assert len([v for f in listing.families for v in f.variants]) == 8
        now = time.monotonic()
        assert not any(running.router.breaker.is_open(f"{FAMILY}-{q}", now) for q in ("q4_0", "q8_0"))
        assert total(running, "quantrouter_breaker_trips_total") == 0
        assert_nothing_in_flight(running)


@pytest.fixture
def busy_backend(ladder: list[object], cache_dir: Path) -> Iterator[EmbeddedServer]:
    """The real embedded backend with no queue: a second request for a busy model gets Ollama's 503."""
    with run_embedded_in_thread(EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=4 * GiB, max_queue=0)) as b:
        yield b


def test_backend_busy_is_resource_exhausted_with_retry_info(busy_backend: EmbeddedServer) -> None:
    with run_in_thread(router_settings(busy_backend), CollectorRegistry()) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        holder = stub.Generate(generate_request(Q4, prompt=LONG_PROMPT, num_predict=2000), timeout=TIMEOUT_S)
        try:
            assert next(holder).HasField("decision")
            assert next(holder).HasField("chunk")  # q4_0 is generating
            for _ in range(Settings().limits.breaker_failures + 1):
                seen = refused_fast(stub, generate_request(Q4))
                assert (seen.code, seen.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BACKEND_BUSY")
                assert seen.retry_delay is not None and seen.retry_delay > 0
                assert "busy" in seen.message
            # Busy is load, not ill health: it must not eject the variant, however often it happens.
            assert not running.router.breaker.is_open(Q4, time.monotonic())
        finally:
            holder.cancel()
        assert_nothing_in_flight(running)


def test_busy_variant_falls_back_for_a_family_request(busy_backend: EmbeddedServer) -> None:
    """Row "Ollama 503 (queue full)": before the first token a family request falls back once to the next
    candidate. The 503 is the backend's own: another client (straight to the backend, unseen by the
    router) holds q4_0 on a backend with no queue. Busy is load: the breaker (1 failure) stays shut."""
    settings = router_settings(busy_backend, breaker_failures=1)
    only = pb.Constraints(allowed_quantizations=["Q4_0", "Q3_K_M"])  # QUALITY takes Q4_0 first
    with run_in_thread(settings, CollectorRegistry()) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel, \
            httpx.stream("POST", f"{busy_backend.url}/api/generate", timeout=TIMEOUT_S, json={
                "model": Q4, "prompt": LONG_PROMPT,
                "options": {"num_predict": 2000, "temperature": 0, "seed": 1}}) as holder:  # greedy: no early end
        assert json.loads(next(holder.iter_lines()))["response"] is not None  # q4_0 is generating
        stub = pb_grpc.RouterServiceStub(channel)
        responses = collect(stub, generate_request(FAMILY, preference=pb.PREFERENCE_QUALITY, constraints=only))
        decisions = [r.decision for r in responses if r.HasField("decision")]
        assert [d.variant for d in decisions] == [Q4, Q3]
        assert decisions[1].fallback and Q4 in decisions[1].reason
        assert responses[-1].completion.variant == Q3
        assert sample(running, "quantrouter_fallbacks_total", model_name=FAMILY, target_model_name=Q4,
                      reason="BACKEND_BUSY") == 1
        assert not running.router.breaker.is_open(Q4, time.monotonic())
    assert_nothing_in_flight(running)


def test_backend_rejection_is_invalid_argument_without_fallback(embedded_backend: EmbeddedServer) -> None:
    """Row "Ollama rejects the options (400)": INVALID_ARGUMENT `BACKEND_REJECTED_REQUEST`, one decision
    (no fallback) and no breaker count (1 failure would open it). The 400 is the backend's own: a
    prompt longer than the `num_ctx` the caller asked for."""
    with run_in_thread(router_settings(embedded_backend, breaker_failures=1), CollectorRegistry()) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        # llama.cpp rounds a context up to 256 tokens; 400 words are 401 tokens.
        request = generate_request(FAMILY, prompt=" ".join(["word"] * 400), preference=pb.PREFERENCE_LATENCY)
        request.options.num_ctx = 256
        call = pb_grpc.RouterServiceStub(channel).Generate(request, timeout=TIMEOUT_S)
        received = []
        with pytest.raises(grpc.RpcError) as raised:
            received.extend(call)
        seen = rich(raised.value)
        assert (seen.code, seen.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BACKEND_REJECTED_REQUEST")
        assert "context length" in seen.message
        assert [r.HasField("decision") for r in received] == [True]
        chosen = received[0].decision.variant
        assert not running.router.breaker.is_open(chosen, time.monotonic())
        assert total(running, "quantrouter_fallbacks_total") == 0
    assert_nothing_in_flight(running)


def test_deleted_variant_pinned_is_not_found(fresh_backend: EmbeddedServer) -> None:
    """Row "Variant … vanished (404)" without a fallback: a pinned tag deleted from the backend
    (`ollama rm`, here DELETE /api/delete) before the router's next catalog refresh is NOT_FOUND
    `VARIANT_MISSING`."""
    settings = router_settings(fresh_backend, tags_refresh_interval=600.0)
    with run_in_thread(settings, CollectorRegistry()) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with ollama.Client(host=fresh_backend.url) as client:
            assert client.delete(Q4).status == "success"
        with pytest.raises(grpc.RpcError) as raised:
            list(pb_grpc.RouterServiceStub(channel).Generate(generate_request(Q4), timeout=TIMEOUT_S))
        seen = rich(raised.value)
        assert (seen.code, seen.reason) == (grpc.StatusCode.NOT_FOUND, "VARIANT_MISSING")
        assert total(running, "quantrouter_fallbacks_total") == 0
    assert_nothing_in_flight(running)


@pytest.fixture
def overpromised(ladder: list[object], cache_dir: Path) -> Iterator[RunningServer]:
    """A router told of 4 GiB in front of a backend with 1000 MiB: F16 is chosen and fails to load (500)."""
    with run_embedded_in_thread(EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=SMALL_BUDGET)) as backend, \
            run_in_thread(router_settings(backend, memory_capacity=4 * GiB, breaker_failures=2,
                                          breaker_cooldown=600.0), CollectorRegistry()) as running:
        yield running


def test_variant_that_fails_to_load_falls_back_once_then_the_breaker_opens(overpromised: RunningServer) -> None:
    """Rows "Variant fails to load (500)" (a fallback for a family; UNAVAILABLE `BACKEND_FAILED` pinned)
    and "The same variant keeps failing" (skipped up front; pinned: FAILED_PRECONDITION)."""
    running = overpromised
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        quality = generate_request(FAMILY, preference=pb.PREFERENCE_QUALITY)
        responses = collect(stub, quality)
        decisions = [r.decision for r in responses if r.HasField("decision")]
        assert [d.variant for d in decisions] == [F16, Q8]
        assert decisions[1].fallback and not decisions[0].fallback
        assert F16 in decisions[1].reason
        assert responses[-1].completion.variant == Q8
        assert sample(running, "quantrouter_fallbacks_total", model_name=FAMILY, target_model_name=F16,
                      reason="BACKEND_FAILED") == 1

        with pytest.raises(grpc.RpcError) as raised:  # pinned, a failed load has no fallback
            list(stub.Generate(generate_request(F16), timeout=TIMEOUT_S))
        seen = rich(raised.value)
        assert (seen.code, seen.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_FAILED")
        # That was F16's second failure in a row: its breaker opens.
        assert sample(running, "quantrouter_breaker_trips_total", model_name=FAMILY, target_model_name=F16) == 1
        wait_for(lambda: sample(running, "quantrouter_variant_breaker_open", model_name=FAMILY,
                                target_model_name=F16) == 1, RECOVERY_TIMEOUT_S, "the breaker gauge")

        responses = collect(stub, quality)  # now F16 is skipped up front: no fallback needed
        decisions = [r.decision for r in responses if r.HasField("decision")]
        assert [d.variant for d in decisions] == [Q8]
        f16 = next(c for c in decisions[0].candidates if c.variant == F16)
        assert not f16.feasible and "cool-down" in f16.rejection
        assert sample(running, "quantrouter_fallbacks_total", model_name=FAMILY, target_model_name=F16,
                      reason="BACKEND_FAILED") == 1

        with pytest.raises(grpc.RpcError) as raised:  # pinned, there is nothing to fall back to
            list(stub.Generate(generate_request(F16), timeout=TIMEOUT_S))
        seen = rich(raised.value)
        assert seen.code == grpc.StatusCode.FAILED_PRECONDITION and "cool-down" in seen.message
    assert_nothing_in_flight(running)


class NVMLError(Exception):
    """pynvml's base error class; `value` is the NVML return code."""

    value = 999

    def __str__(self) -> str:
        return {15: "GPU is lost", 999: "Unknown Error"}.get(self.value, f"NVML error {self.value}")


class NVMLError_GpuIsLost(NVMLError):
    value = 15


@dataclasses.dataclass
class _Memory:
    """pynvml's `c_nvmlMemory_t` (v1): total, free, used in bytes."""

    total: int
    free: int
    used: int


class FlakyNvml:
    """A stand-in for the `pynvml` module (no GPU here): one 24 GiB GPU, with NVML's function names,
    return shapes and error classes (docs/quantization.md §5). `lost` makes every device call raise
    `NVMLError_GpuIsLost`, as a GPU that fell off the bus does; clearing it brings the GPU back.
    """

    NVMLError = NVMLError
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    TOTAL = 24 * GiB

    def __init__(self) -> None:
        self.lost = threading.Event()
        self.initialised = 0

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def _device(self) -> None:
        if self.lost.is_set():
            raise NVMLError_GpuIsLost()

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        self._device()
        return ("handle", index)

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> _Memory:
        self._device()
        return _Memory(self.TOTAL, 20 * GiB, 4 * GiB)

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        self._device()
        return "GPU-5a5c1e6a-0000-4000-8000-000000000001"

    def nvmlDeviceGetName(self, handle: object) -> str:
        self._device()
        return "NVIDIA L4"


def test_nvml_errors_at_runtime_degrade_to_static_and_routing_continues(embedded_backend: EmbeddedServer) -> None:
    nvml = FlakyNvml()
    with run_in_thread(router_settings(embedded_backend, nvml_poll_interval=0.05), CollectorRegistry(),
                       nvml_loader=lambda: nvml) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)

        def source() -> pb.MemoryStatus:
            return stub.ListVariants(pb.ListVariantsRequest(), timeout=TIMEOUT_S).memory

        assert source().source == "nvml" and source().total_bytes == FlakyNvml.TOTAL
        nvml.lost.set()
        degraded = wait_for(lambda: (m := source()).source == "static" and m, RECOVERY_TIMEOUT_S, "degradation")
        assert "NVML failed (GPU is lost)" in degraded.detail
        assert 'source="static"' in scrape(running)
        responses = collect(stub, generate_request(FAMILY))
        assert responses[0].decision.memory_source == "static"
        nvml.lost.clear()
        wait_for(lambda: source().source == "nvml", RECOVERY_TIMEOUT_S, "NVML to be used again")
        assert running.router.probe.nvml_errors > 0


def test_nvml_failing_from_the_first_read_still_starts(embedded_backend: EmbeddedServer) -> None:
    nvml = FlakyNvml()
    nvml.lost.set()  # nvmlInit works, then every device call fails
    with run_in_thread(router_settings(embedded_backend), CollectorRegistry(), nvml_loader=lambda: nvml) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        memory = stub.ListVariants(pb.ListVariantsRequest(), timeout=TIMEOUT_S).memory
        assert memory.source == "static" and "GPU is lost" in memory.detail
        collect(stub, generate_request(FAMILY))
