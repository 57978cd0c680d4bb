"""Cancellation and deadlines: the client's cancel or expired deadline stops llama.cpp at once, and
a thousand cancelled streams leave no task, descriptor, socket or in-flight slot behind.

The backend side is checked on the real embedded server: its scheduler says whether the model is
still busy, and a next request for the same variant (which waits for the model's lock) is served promptly.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from prometheus_client import CollectorRegistry

from quantrouter.capacity import capacity_of
from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, run_embedded_in_thread
from quantrouter.server import RunningServer, run_in_thread
from quantrouter.units import GiB
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from tests.hardening.helpers import LONG_PROMPT, generate_request, total, wait_for
from tests.support import FAMILY, router_settings

TIMEOUT_S = 30.0
# Above the policy's estimate for one token from a warm model, with room on a busy machine.
DEADLINE_S = 5.0
WARM_TOKENS = 16
# What LONG_PROMPT's greedy answer lasts at least (it ran to the 2,027-token limit of num_ctx 2048).
ANSWER_TOKENS = 2000
# A stop that did not reach llama.cpp keeps the model busy for the rest of the answer; the checks allow this
# share of that time at the speed just measured on this machine, so a loaded one is given more. A quarter:
# with four engineers' suites on two cores, the speed of one short answer and of the next long one differed
# up to 2× (8 and 17 tok/s), and a stop takes a token or two.
STOP_SHARE = 0.25
# What a stop and the next request take whatever the decode speed (a poll of the backend's state, the stop
# reaching llama.cpp at its next token, the next request's decision, prompt and two tokens over gRPC): on a
# fast machine a quarter of the rest of the answer can be less than that.
STOP_FLOOR_S = 0.5
# Floor or not, the allowance stays under this share of the rest of the answer, so that a generation that
# ignored the stop is still running when it ends, however fast the machine.
STOP_CEILING_SHARE = 0.75
CANCELLED_STREAMS = 1000
CONCURRENCY = 16
Q4 = f"{FAMILY}-q4_0"
# Slack for the router's own background work (a catalog refresh in progress) when counting.
TASK_SLACK = 3
# httpx keeps up to 20 idle keep-alive connections (its default Limits); both ends live in this process,
# and how many a round leaves idle depends on its peak concurrency. A leak grows with the stream count.
POOL_SOCKETS = 2 * 20
T = TypeVar("T")


@pytest.fixture
def stack(ladder: list[object], cache_dir: Path) -> Iterator[tuple[EmbeddedServer, RunningServer]]:
    """A private backend and router; the router assumes 1 token per request when none is given, so the
    deadline filter admits an open-ended generation that then outlives the deadline."""
    with run_embedded_in_thread(EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=4 * GiB)) as backend, \
            run_in_thread(router_settings(backend, num_predict_default=1), CollectorRegistry()) as running:
        yield backend, running


def busy(backend: EmbeddedServer) -> bool:
    return any(m.busy for m in backend.resident())


def warm_speed(stub: pb_grpc.RouterServiceStub) -> float:
    """Tokens per second of a warm Q4 on this machine now. Measured on a second answer: the first one loads
    the model and pages its weights in, and decoded at half the speed of the next (measured)."""
    for _ in range(2):
        warm = list(stub.Generate(generate_request(Q4, num_predict=WARM_TOKENS), timeout=TIMEOUT_S))
    return float(warm[-1].completion.tokens_per_second)


def stop_allowance(tokens_left: float, tokens_per_second: float) -> float:
    """Seconds the backend may take to stop and serve again: `STOP_SHARE` of what the `tokens_left` of an
    abandoned answer would hold the model for, at least `STOP_FLOOR_S` and at most `STOP_CEILING_SHARE` of it:
    a generation that ignored the stop is still running when the allowance ends, on a fast or a slow machine."""
    rest = tokens_left / tokens_per_second
    return min(max(STOP_FLOOR_S, STOP_SHARE * rest), STOP_CEILING_SHARE * rest)


def assert_backend_free_and_serving(backend: EmbeddedServer, stub: pb_grpc.RouterServiceStub,
                                    allowance: float) -> None:
    started = time.monotonic()
    wait_for(lambda: not busy(backend), allowance, "the backend to stop generating")
    responses = list(stub.Generate(generate_request(Q4, num_predict=2), timeout=TIMEOUT_S))
    assert responses[-1].HasField("completion")
    assert time.monotonic() - started < allowance, "the next request waited for the abandoned generation"


def test_client_cancel_stops_the_generation(stack: tuple[EmbeddedServer, RunningServer]) -> None:
    backend, running = stack
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        speed = warm_speed(stub)
        # No deadline: the deadline filter would rule a 4000-token answer out; the cancel ends it.
        call = stub.Generate(generate_request(Q4, prompt=LONG_PROMPT, num_predict=4000))
        assert next(call).HasField("decision")
        assert next(call).HasField("chunk")
        assert busy(backend)
        call.cancel()
        assert call.code() == grpc.StatusCode.CANCELLED
        assert_backend_free_and_serving(backend, stub, stop_allowance(ANSWER_TOKENS, speed))
    assert running.router.in_flight == 0 and variants_in_flight(running) == 0


def test_expired_deadline_stops_the_generation(stack: tuple[EmbeddedServer, RunningServer]) -> None:
    backend, running = stack
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        speed = warm_speed(stub)
        # The open-ended answer runs past ANSWER_TOKENS (LONG_PROMPT, greedy); the deadline expires halfway
        # through those at the speed just measured, on any machine, and is at most DEADLINE_S on a slow one.
        deadline = min(DEADLINE_S, ANSWER_TOKENS / speed / 2)
        allowance = stop_allowance(ANSWER_TOKENS - deadline * speed, speed)  # the rest, at least half the answer
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Generate(generate_request(Q4, prompt=LONG_PROMPT, num_predict=None), timeout=deadline))
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert_backend_free_and_serving(backend, stub, allowance)
    assert running.router.in_flight == 0


def open_descriptors() -> tuple[int, int]:
    """(all, sockets) open in this process: the router, the backend and the client all live here."""
    links = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if fd.isdigit()
             and os.path.exists(f"/proc/self/fd/{fd}")]
    return len(links), sum(link.startswith("socket:") for link in links)


def on_router_loop(running: RunningServer, read: Callable[[], T]) -> T:
    """`read()` run on the router's own event loop, where its state changes."""
    async def call() -> T:
        return read()

    return asyncio.run_coroutine_threadsafe(call(), running.loop).result(TIMEOUT_S)


def router_tasks(running: RunningServer) -> int:
    return on_router_loop(running, lambda: len(asyncio.all_tasks()))


def variants_in_flight(running: RunningServer) -> int:
    """The streams the router's capacity report (what WatchCapacity sends a fleet) counts on its variants."""
    return on_router_loop(running, lambda: sum(v.in_flight for v in capacity_of(running.router).variants))


async def test_a_thousand_cancelled_streams_leak_nothing(stack: tuple[EmbeddedServer, RunningServer]) -> None:
    """Two rounds of 500: the second must not add tasks, and descriptors and sockets only up to the size
    of the keep-alive pool; a leak would add one per cancelled stream."""
    backend, running = stack
    router = running.router
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        warm = [r async for r in stub.Generate(generate_request(Q4, num_predict=2), timeout=TIMEOUT_S)]
        assert warm[-1].HasField("completion")
        requests_before = total(running, "quantrouter_requests_total")

        async def cancel_after_the_decision(count: int) -> None:
            for _ in range(count):
                call = stub.Generate(generate_request(Q4, num_predict=4000))
                first = await asyncio.wait_for(call.read(), TIMEOUT_S)
                assert first.HasField("decision")
                call.cancel()

        async def round_of(streams: int) -> dict[str, int]:
            per_worker, rest = divmod(streams, CONCURRENCY)
            await asyncio.gather(*(cancel_after_the_decision(per_worker + (i < rest)) for i in range(CONCURRENCY)))
            state: dict[str, int] = {}

            def settled() -> bool:
                fds, sockets = open_descriptors()
                state.update(in_flight=router.in_flight, variants=variants_in_flight(running),
                             busy=int(busy(backend)), gauge=int(total(running, "quantrouter_in_flight_requests")),
                             tasks=router_tasks(running), fds=fds, sockets=sockets)
                return not (state["in_flight"] or state["variants"] or state["busy"] or state["gauge"])

            await asyncio.to_thread(wait_for, settled, TIMEOUT_S, lambda: f"the router to settle: {state}")
            return state

        first = await round_of(CANCELLED_STREAMS // 2)
        second = await round_of(CANCELLED_STREAMS - CANCELLED_STREAMS // 2)

        def back_to_the_first_round() -> bool:  # closed connections take a moment to be reaped
            fds, sockets = open_descriptors()
            second.update(tasks=router_tasks(running), fds=fds, sockets=sockets)
            return (second["tasks"] <= first["tasks"] + TASK_SLACK and fds <= first["fds"] + POOL_SOCKETS
                    and sockets <= first["sockets"] + POOL_SOCKETS)

        await asyncio.to_thread(wait_for, back_to_the_first_round, TIMEOUT_S,
                                lambda: f"no growth between rounds: first {first}, second {second}")
        # Each stream was recorded exactly once, however it ended (the router's `finally`).
        assert total(running, "quantrouter_requests_total") - requests_before == CANCELLED_STREAMS
        responses = [r async for r in stub.Generate(generate_request(Q4, num_predict=2), timeout=TIMEOUT_S)]
        assert responses[-1].HasField("completion")
