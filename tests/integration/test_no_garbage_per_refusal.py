"""A refused stream, or one denied for want of a token, leaves no reference cycle behind in the router: what it
allocated is freed when it ends.

Why it matters: a cycle is freed only by the garbage collector, whose full collections are rare, and what a
burst's refusals leave for it (each a gRPC call's state, the request, the error and its traceback's frames:
about 50 objects) is scattered through the memory the burst took, where any object still allocated keeps its
1 MiB arena of CPython's small-object allocator resident (bench/results/load-1000.md). Aborting the call
(`abort_with_status`) left one cycle per refusal: grpc keeps the AbortError on the call's state, and the
error's traceback holds the frames whose locals hold the call's context, which holds that state. With the
collector off, a real router (gRPC over a socket, the canned Ollama fixture in its own process, capped at one
stream) refuses 100 streams and denies 100 without a token; a collection then finds what they left in cycles
(before the fix about 50 objects for each; the client's own, in this process too, are other types). In a
process of its own: the collector is the whole process's, and other tests leave routers running in this one.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections import Counter

import grpc
from bench.fixtures.canned_ollama import FAMILY

from quantrouter.client import error_details
from quantrouter.server import RunningServer
from quantrouter.service import SERVICE_NAME
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from tests.hardening.helpers import wait_for
from tests.integration.own_process import measured_in_own_process, router_over_canned

REFUSALS = 100
TOKEN = "burst-token"
AUTHORIZED = (("authorization", f"Bearer {TOKEN}"),)
TIMEOUT_S = 60.0
# The stream that holds the router's one slot while the others are refused: 8 s at 4 tok/s.
HOLD_TOKENS = 32
HOLD_TOKENS_PER_S = 4.0
# The router's objects of a refused call; the client's own (in this process too) are other types.
REFUSAL_TYPES = ("Overloaded", "Unauthenticated", "RPCState", "_ServicerContext", "GenerateRequest",
                 "RoutingRequest")
# Fewer than one refusal's objects in ten: what the collector finds of one type is not one per refusal.
KEPT_AT_MOST = REFUSALS // 10


def _request(tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=FAMILY, prompt="Why is the sky blue?",
                              options=pb.GenerationOptions(num_predict=tokens))


async def _refused(stub: pb_grpc.RouterServiceStub) -> None:
    try:
        async for _ in stub.Generate(_request(1), timeout=TIMEOUT_S, metadata=AUTHORIZED):
            raise AssertionError("a stream was served while the router's one slot was taken")
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert error_details(error).retry_after is not None, "the refusal lost its RetryInfo"


async def _denied(stub: pb_grpc.RouterServiceStub) -> None:
    try:
        async for _ in stub.Generate(_request(1), timeout=TIMEOUT_S):
            raise AssertionError("a stream without a token was served")
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        assert error_details(error).reason, "the denial lost its ErrorInfo"


async def _garbage_of_refusals(router: RunningServer) -> dict[str, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        await _refused_until_held(stub, router)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage, to be counted
        try:
            await asyncio.gather(*(_refused(stub) for _ in range(REFUSALS)), *(_denied(stub) for _ in range(REFUSALS)))
            gc.collect()
            found = Counter(type(o).__name__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    handled = router.registry.get_sample_value("grpc_server_handled_total", {
        "grpc_type": "server_stream", "grpc_service": SERVICE_NAME, "grpc_method": "Generate",
        "grpc_code": "RESOURCE_EXHAUSTED"})
    return {name: found[name] for name in REFUSAL_TYPES} | {"all": sum(found.values()), "handled": int(handled or 0)}


async def _refused_until_held(stub: pb_grpc.RouterServiceStub, router: RunningServer) -> None:
    """One stream takes the router's only slot and keeps it for the test (it ends on its own)."""
    held = stub.Generate(_request(HOLD_TOKENS), timeout=TIMEOUT_S, metadata=AUTHORIZED)
    await held.read()  # its decision: the stream is admitted
    await asyncio.to_thread(wait_for, lambda: router.router.in_flight == 1, TIMEOUT_S, "the held stream")
    await _refused(stub)  # the first refusal's and denial's one-time work (metric children) before counting
    await _denied(stub)


def _measure() -> dict[str, int]:
    with router_over_canned(HOLD_TOKENS_PER_S, max_in_flight=1, max_in_flight_per_family=1,
                            auth_token=TOKEN) as running:
        return asyncio.run(_garbage_of_refusals(running))


def test_a_refused_stream_leaves_no_reference_cycle() -> None:
    found = measured_in_own_process("tests.integration.test_no_garbage_per_refusal")
    kept = {name: count for name, count in found.items() if name in REFUSAL_TYPES and count > KEPT_AT_MOST}
    assert not kept, f"{REFUSALS} refusals left reference cycles for the collector: {found}"
    # The status set on the context is the call's code for the metrics too, as an abort's was.
    assert found["handled"] == REFUSALS + 1, f"grpc_server_handled_total counted {found['handled']} refusals"


if __name__ == "__main__":
    print(json.dumps(_measure()))
