"""A burst of streams through a real router (gRPC over a socket, the real `ollama` client over HTTP to the
canned Ollama fixture in its own process) leaves none of the router's own allocations behind per stream.

Why it matters: an object a stream leaves behind (the offered-load window kept a tuple and two floats per
routing, for 30 s and on an idle router until the next request) is scattered through the memory the burst
took, and one live object keeps a whole 1 MiB arena of CPython's small-object allocator resident
(bench/results/load-1000.md). tracemalloc counts what is still allocated after the burst, by the line of
quantrouter that allocated it. It does so in a process of its own: tracemalloc sees a whole process, and other
tests leave routers of their own running in this one (the fleet tests' session-wide nodes report every 0.2 s).
"""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from pathlib import Path

import grpc
from bench.fixtures.canned_ollama import FAMILY

import quantrouter
from quantrouter.server import RunningServer
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from tests.hardening.helpers import wait_for
from tests.integration.own_process import measured_in_own_process, router_over_canned

STREAMS = 400
WARM_UP = 16
TOKENS = 8
TIMEOUT_S = 60.0
# What may stay of the burst at one line: the latest snapshots the router keeps (speeds, catalog, candidate
# tables) leave a few blocks a line (at most 7 measured, more with more catalog refreshes on a busy machine),
# however many streams ran; what a line allocates for every stream would leave 400 or more (the old load window
# left 734 at one line).
KEPT_AT_MOST = STREAMS // 4
PACKAGE = Path(quantrouter.__file__).parent
# Not the router: the generated protobuf modules.
ELSEWHERE = str(PACKAGE / "v1")


async def _streams(stub: pb_grpc.RouterServiceStub, count: int) -> None:
    request = pb.GenerateRequest(model=FAMILY, prompt="Why is the sky blue?",
                                 options=pb.GenerationOptions(num_predict=TOKENS))

    async def one() -> None:
        responses = [r async for r in stub.Generate(request, timeout=TIMEOUT_S)]
        assert responses[-1].HasField("completion")

    await asyncio.gather(*(one() for _ in range(count)))


def _kept_by_quantrouter(snapshot: tracemalloc.Snapshot) -> dict[str, int]:
    """Blocks still allocated, by the router's line that allocated them."""
    kept: dict[str, int] = {}
    for trace in snapshot.traces:
        frame = trace.traceback[0]
        if frame.filename.startswith(str(PACKAGE)) and not frame.filename.startswith(ELSEWHERE):
            line = f"{Path(frame.filename).name}:{frame.lineno}"
            kept[line] = kept.get(line, 0) + 1
    return kept


async def _burst(router: RunningServer) -> dict[str, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        await _streams(stub, WARM_UP)  # lazy imports, caches and the first speed samples: before counting
        tracemalloc.start(1)
        try:
            await _streams(stub, STREAMS)
            await asyncio.to_thread(wait_for, lambda: router.router.in_flight == 0, TIMEOUT_S, "the streams to end")
            gc.collect()
            kept = _kept_by_quantrouter(tracemalloc.take_snapshot())
        finally:
            tracemalloc.stop()
    return kept


def _measure() -> dict[str, int]:
    """The router in this process, in front of the canned fixture in its own: what the burst left, by line."""
    with router_over_canned(0.0, max_in_flight=STREAMS, max_in_flight_per_family=STREAMS) as running:
        return asyncio.run(_burst(running))


def test_a_burst_leaves_no_allocation_of_the_router_per_stream() -> None:
    kept = measured_in_own_process("tests.integration.test_nothing_kept_per_stream")
    assert kept, "tracemalloc saw nothing the router allocated during the burst still held: the filter is wrong"
    worst = sorted(kept.items(), key=lambda item: -item[1])
    assert worst[0][1] <= KEPT_AT_MOST, f"the router kept per stream: {worst}"


if __name__ == "__main__":
    print(json.dumps(_measure()))
