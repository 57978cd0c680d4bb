"""Back-pressure: beyond the in-flight caps (per process, per family) the router answers
RESOURCE_EXHAUSTED with RetryInfo at once instead of queueing; message sizes are capped on purpose.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from quantrouter.config import ConfigError, load_settings
from quantrouter.embedded import EmbeddedServer
from quantrouter.server import run_in_thread
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from tests.hardening.helpers import LONG_PROMPT, generate_request, rich, total, wait_for
from tests.support import FAMILY, router_settings

TIMEOUT_S = 30.0
# A refusal takes milliseconds; a queued request would wait out a holder's 4,000 tokens (a minute or
# more), so 3 s keeps the two apart even on two cores shared with other suites.
AT_ONCE_S = 3.0
HOLDERS = (f"{FAMILY}-q4_0", f"{FAMILY}-q8_0")


def hold(stub: pb_grpc.RouterServiceStub, tag: str) -> Any:
    """A stream that stays open (a long answer, no deadline) once its decision has arrived."""
    call = stub.Generate(generate_request(tag, prompt=LONG_PROMPT, num_predict=4000))
    assert next(call).HasField("decision")
    return call


def refused(stub: pb_grpc.RouterServiceStub) -> Any:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(generate_request(FAMILY), timeout=TIMEOUT_S))
    assert time.monotonic() - started < AT_ONCE_S, "the refusal was queued instead of immediate"
    seen = rich(raised.value)
    assert (seen.code, seen.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "ROUTER_OVERLOADED")
    assert seen.retry_delay is not None and seen.retry_delay > 0
    return seen


@pytest.fixture
def capped(embedded_backend: EmbeddedServer, request: pytest.FixtureRequest) -> Iterator[pb_grpc.RouterServiceStub]:
    with run_in_thread(router_settings(embedded_backend, **request.param), CollectorRegistry()) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel, ExitStack() as holders:
        stub = pb_grpc.RouterServiceStub(channel)
        for tag in HOLDERS:
            holders.callback(hold(stub, tag).cancel)
        yield stub
        holders.close()
        wait_for(lambda: running.router.in_flight == 0 and total(running, "quantrouter_in_flight_requests") == 0,
                 TIMEOUT_S, "the held streams to be released")
        responses = list(stub.Generate(generate_request(FAMILY), timeout=TIMEOUT_S))  # admitted again
        assert responses[-1].HasField("completion")


@pytest.mark.parametrize("capped", [{"max_in_flight": len(HOLDERS)}], indirect=True)
def test_process_cap_refuses_at_once_with_retry_info(capped: pb_grpc.RouterServiceStub) -> None:
    seen = refused(capped)
    assert f"limit of {len(HOLDERS)} streams" in seen.message
    # Route is a dry run: it holds nothing and stays available under the cap.
    assert capped.Route(pb.RouteRequest(model=FAMILY), timeout=TIMEOUT_S).decision.variant


@pytest.mark.parametrize("capped", [{"max_in_flight_per_family": len(HOLDERS)}], indirect=True)
def test_family_cap_refuses_at_once_and_names_the_family(capped: pb_grpc.RouterServiceStub) -> None:
    seen = refused(capped)
    assert FAMILY in seen.message


@pytest.fixture
def small_messages(embedded_backend: EmbeddedServer) -> Iterator[pb_grpc.RouterServiceStub]:
    with run_in_thread(router_settings(embedded_backend, max_prompt_bytes=16 * 1024, max_message_bytes=64 * 1024),
                       CollectorRegistry()) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.RouterServiceStub(channel)


def test_configured_message_cap_is_enforced_by_grpc(small_messages: pb_grpc.RouterServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(small_messages.Generate(generate_request(FAMILY, prompt="a" * 32 * 1024), timeout=TIMEOUT_S))
    seen = rich(raised.value)
    assert (seen.code, seen.reason, seen.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST",
                                                     ("prompt",))
    with pytest.raises(grpc.RpcError) as raised:
        list(small_messages.Generate(generate_request(FAMILY, prompt="a" * 100 * 1024), timeout=TIMEOUT_S))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


def test_prompt_limit_must_fit_in_a_message() -> None:
    with pytest.raises(ConfigError, match="max_prompt_bytes"):
        load_settings({"max_prompt_bytes": "16MiB", "max_message_bytes": "8MiB"}, {})
