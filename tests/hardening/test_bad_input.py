"""Bad input over a real gRPC socket: each gets the right status, a readable message and an ErrorInfo reason.

After every case the same channel still routes a good request, so one bad caller never breaks the service.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from tests.hardening.helpers import PROMPT, generate_request, rich
from tests.support import FAMILY

GENERATE = "/quantrouter.v1.RouterService/Generate"
ROUTE = "/quantrouter.v1.RouterService/Route"
TIMEOUT_S = 30.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def stub(target: str) -> Iterator[pb_grpc.RouterServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield pb_grpc.RouterServiceStub(channel)
        # The service keeps serving after whatever the test sent.
        decision = pb_grpc.RouterServiceStub(channel).Route(pb.RouteRequest(model=FAMILY), timeout=TIMEOUT_S)
        assert decision.decision.variant.startswith(FAMILY)


def generate_error(stub: pb_grpc.RouterServiceStub, request: pb.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request, timeout=TIMEOUT_S))
    return raised.value


def route_error(stub: pb_grpc.RouterServiceStub, request: pb.RouteRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Route(request, timeout=TIMEOUT_S)
    return raised.value


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
def test_empty_or_whitespace_prompt(stub: pb_grpc.RouterServiceStub, prompt: str) -> None:
    seen = rich(generate_error(stub, generate_request(FAMILY, prompt=prompt)))
    assert (seen.code, seen.reason, seen.fields) == (INVALID, "INVALID_REQUEST", ("prompt",))
    assert "prompt" in seen.message and "empty" in seen.message


def test_missing_model(stub: pb_grpc.RouterServiceStub) -> None:
    seen = rich(generate_error(stub, generate_request("")))
    assert (seen.code, seen.reason, seen.fields) == (INVALID, "INVALID_REQUEST", ("model",))
    assert "name a model family" in seen.message


def test_unknown_family_is_not_found_and_lists_what_is_known(stub: pb_grpc.RouterServiceStub) -> None:
    seen = rich(generate_error(stub, generate_request("llama9:1t")))
    assert (seen.code, seen.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert "llama9:1t" in seen.message and FAMILY in seen.message


def test_pinned_tag_that_does_not_exist(stub: pb_grpc.RouterServiceStub) -> None:
    seen = rich(generate_error(stub, generate_request(f"{FAMILY}-q7_K")))
    assert (seen.code, seen.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert f"{FAMILY}-q7_K" in seen.message


def test_unknown_enum_value(stub: pb_grpc.RouterServiceStub) -> None:
    request = generate_request(FAMILY)
    request.preference = 42  # proto3 enums are open: the wire carries any int32
    seen = rich(generate_error(stub, request))
    assert (seen.code, seen.reason, seen.fields) == (INVALID, "INVALID_REQUEST", ("preference",))
    assert "unknown value 42" in seen.message


@pytest.mark.parametrize(("constraints", "field"), [
    (pb.Constraints(min_quantization="Q9_Z"), "constraints.min_quantization"),
    (pb.Constraints(allowed_quantizations=["Q4_K_M", "nonsense"]), "constraints.allowed_quantizations[1]"),
    (pb.Constraints(min_tokens_per_second=-1.0), "constraints.min_tokens_per_second"),
    (pb.Constraints(min_tokens_per_second=math.nan), "constraints.min_tokens_per_second"),
])
def test_malformed_constraints(stub: pb_grpc.RouterServiceStub, constraints: pb.Constraints, field: str) -> None:
    seen = rich(route_error(stub, pb.RouteRequest(model=FAMILY, constraints=constraints)))
    assert (seen.code, seen.reason, seen.fields) == (INVALID, "INVALID_REQUEST", (field,))


@pytest.mark.parametrize("constraints", [
    pb.Constraints(min_quantization="Q8_0", allowed_quantizations=["Q2_K", "Q3_K_M"]),
    pb.Constraints(min_quantization="F16", allowed_quantizations=["Q4_0"]),
    pb.Constraints(min_tokens_per_second=1e9),
])
def test_contradictory_constraints_are_failed_precondition_with_reasons(
        stub: pb_grpc.RouterServiceStub, constraints: pb.Constraints) -> None:
    seen = rich(generate_error(stub, generate_request(FAMILY, constraints=constraints)))
    assert (seen.code, seen.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_VARIANT_MEETS_CONSTRAINTS")
    assert FAMILY in seen.message


@pytest.mark.parametrize(("option", "value"), [
    ("num_predict", -7), ("num_predict", 2**31 - 1), ("num_ctx", 0), ("num_ctx", -4096), ("num_ctx", 2**31 - 1),
    ("temperature", -0.5), ("temperature", 1e30), ("temperature", math.inf), ("temperature", math.nan),
    ("top_p", 1.5), ("top_k", -1),
])
def test_negative_or_absurd_options(stub: pb_grpc.RouterServiceStub, option: str, value: float) -> None:
    request = generate_request(FAMILY)
    setattr(request.options, option, value)
    seen = rich(generate_error(stub, request))
    assert (seen.code, seen.reason, seen.fields) == (INVALID, "INVALID_REQUEST", (f"options.{option}",))
    assert "outside" in seen.message


def test_every_violation_is_reported_at_once(stub: pb_grpc.RouterServiceStub) -> None:
    request = generate_request("", prompt=" ", constraints=pb.Constraints(min_quantization="Q9"))
    request.options.temperature = -1
    seen = rich(generate_error(stub, request))
    assert seen.code == INVALID
    assert set(seen.fields) == {"prompt", "model", "constraints.min_quantization", "options.temperature"}


def test_prompt_over_the_size_limit(stub: pb_grpc.RouterServiceStub) -> None:
    over = "a" * (1024 * 1024 + 1)  # the default max_prompt_bytes is 1 MiB, under the 8 MiB message cap
    seen = rich(generate_error(stub, generate_request(FAMILY, prompt=over)))
    assert (seen.code, seen.reason, seen.fields) == (INVALID, "INVALID_REQUEST", ("prompt",))
    assert "over the 1048576-byte limit" in seen.message


def test_message_over_the_grpc_limit_is_resource_exhausted(stub: pb_grpc.RouterServiceStub) -> None:
    huge = "a" * (9 * 1024 * 1024)  # over max_message_bytes (8 MiB): gRPC itself refuses it
    error = generate_error(stub, generate_request(FAMILY, prompt=huge))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


@pytest.mark.parametrize(("method", "request_bytes"), [
    (GENERATE, generate_request(FAMILY, prompt="xx").SerializeToString().replace(b"xx", b"\xff\xfe")),
    (GENERATE, generate_request("gemma3:270\xe9").SerializeToString().replace("\xe9".encode(), b"\xe9")),
    (ROUTE, pb.RouteRequest(model=FAMILY, prompt="xx").SerializeToString().replace(b"xx", b"\xc3\x28")),
], ids=["generate-prompt", "generate-model", "route-prompt"])
def test_non_utf8_strings_are_invalid_argument(target: str, stub: pb_grpc.RouterServiceStub, method: str,
                                               request_bytes: bytes) -> None:
    """protobuf refuses invalid UTF-8 in `string` fields; the caller must hear why, not INTERNAL."""
    with grpc.insecure_channel(target) as channel:
        identity = lambda raw: raw  # noqa: E731 - the request is already bytes on the wire
        if method == GENERATE:
            call: Any = channel.unary_stream(method, request_serializer=identity,
                                             response_deserializer=pb.GenerateResponse.FromString)
            with pytest.raises(grpc.RpcError) as raised:
                list(call(request_bytes, timeout=TIMEOUT_S))
        else:
            call = channel.unary_unary(method, request_serializer=identity,
                                       response_deserializer=pb.RouteResponse.FromString)
            with pytest.raises(grpc.RpcError) as raised:
                call(request_bytes, timeout=TIMEOUT_S)
    seen = rich(raised.value)
    assert (seen.code, seen.reason) == (INVALID, "MALFORMED_REQUEST")
    assert "UTF-8" in seen.message


def test_garbage_bytes_are_invalid_argument(target: str, stub: pb_grpc.RouterServiceStub) -> None:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(ROUTE, request_serializer=lambda raw: raw,
                                   response_deserializer=pb.RouteResponse.FromString)
        with pytest.raises(grpc.RpcError) as raised:
            call(b"\x0a\xff\xff\xff\xff\x0f", timeout=TIMEOUT_S)
    seen = rich(raised.value)
    assert (seen.code, seen.reason) == (INVALID, "MALFORMED_REQUEST")
    assert "RouteRequest" in seen.message


@pytest.mark.parametrize(("messages", "field"), [
    ([], "messages"),
    ([pb.ChatMessage(role="wizard", content="hi")], "messages[0].role"),
    ([pb.ChatMessage(role="user", content="  ")], "messages"),
])
def test_bad_chat_messages(stub: pb_grpc.RouterServiceStub, messages: list[pb.ChatMessage], field: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Chat(pb.ChatRequest(model=FAMILY, messages=messages), timeout=TIMEOUT_S))
    seen = rich(raised.value)
    assert (seen.code, seen.reason, set(seen.fields)) == (INVALID, "INVALID_REQUEST", {field})


def test_stop_sequences_out_of_bounds(stub: pb_grpc.RouterServiceStub) -> None:
    request = generate_request(FAMILY, prompt=PROMPT)
    request.options.stop.extend([""])
    seen = rich(generate_error(stub, request))
    assert (seen.code, seen.fields) == (INVALID, ("options.stop",))


def test_a_deadline_no_variant_can_meet_is_deadline_exceeded_predicted(stub: pb_grpc.RouterServiceStub) -> None:
    """4,096 tokens within half the best expected time (3 s at most): every variant's expected time is past the
    deadline, so the router answers DEADLINE_EXCEEDED itself (ErrorInfo says predicted, with the best expected
    time) rather than FAILED_PRECONDITION, and well before the caller's own timer would fire.

    The deadline follows the router's own prices (a dry-run Route), not a guess at this machine's speed: a
    fixed 3 s would admit 4,096 tokens on a machine that decodes them faster."""
    request = generate_request(FAMILY, num_predict=4096)
    # No deadline on the dry run: the router would price against it and refuse.
    priced = stub.Route(pb.RouteRequest(model=FAMILY, prompt=request.prompt, options=request.options)).decision
    fastest = min(c.expected_duration.ToTimedelta().total_seconds() for c in priced.candidates if c.feasible)
    deadline = min(3.0, fastest / 2)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request, timeout=deadline))
    seen = rich(raised.value)
    assert (seen.code, seen.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_PREDICTED")
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.metadata["predicted"] == "true"
    best = float(info.metadata["best_expected_seconds"])
    assert best > deadline, "the best candidate's expected time is past the deadline"
    assert f"{best:.2f} s exceeds" in seen.message  # the best candidate's own refusal names that time
