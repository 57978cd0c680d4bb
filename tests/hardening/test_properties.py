"""Property: any well-typed request gets either a complete answer or a clean gRPC error with a reason.

Hypothesis builds random `GenerateRequest`s and `RouteRequest`s (names real and made up, open enum
values, NaN and infinite numbers, options in and out of range). Generation is kept short (a few
tokens at most, one context size) and every call has a deadline, so the test stays bounded.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantrouter.quant import QUANT_TYPES
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from tests.support import FAMILY

DEADLINE_S = 30.0
# Statuses that mean "your request" or "not now"; never UNKNOWN or INTERNAL.
CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

quant_names = st.sampled_from([q.name for q in QUANT_TYPES] + ["", "q4_k_m", "Q9_Z", "fp16"])
models = st.one_of(st.sampled_from([FAMILY, f"{FAMILY}-q4_0", f"{FAMILY}-q8_0", f"{FAMILY}-q7_K", "", " ",
                                    "llama3.1:8b", FAMILY.upper()]), st.text(max_size=20))
numbers = st.floats(allow_nan=True, allow_infinity=True, width=32)
# Short generations only: no -1/-2 ("until stop"), which the property would pay for in seconds.
num_predicts = st.one_of(st.integers(0, 4), st.integers(-(2**31), -3), st.integers(2**21, 2**31 - 1))


@st.composite
def constraints(draw: st.DrawFn) -> pb.Constraints:
    message = pb.Constraints(min_quantization=draw(quant_names),
                             allowed_quantizations=draw(st.lists(quant_names, max_size=3)),
                             min_tokens_per_second=draw(st.one_of(st.just(0.0), st.floats(allow_nan=True))))
    if draw(st.booleans()):
        message.max_time_to_first_token.FromNanoseconds(draw(st.integers(-(10**9), 10**11)))
    return message


@st.composite
def options(draw: st.DrawFn) -> pb.GenerationOptions:
    message = pb.GenerationOptions(num_predict=draw(num_predicts), stop=draw(st.lists(st.text(max_size=4),
                                                                                       max_size=3)),
                                   format=draw(st.sampled_from(["", "json", "yaml"])))
    for name in ("temperature", "top_p"):
        if draw(st.booleans()):
            setattr(message, name, draw(numbers))
    if draw(st.booleans()):
        message.top_k = draw(st.integers(-(2**31), 2**31 - 1))
    if draw(st.booleans()):
        message.seed = draw(st.integers(-(2**63), 2**63 - 1))
    num_ctx = draw(st.sampled_from([None, 0, -1, 2**22, 4096]))  # 4096 = the router's: no reload
    if num_ctx is not None:
        message.num_ctx = num_ctx
    return message


preferences = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-(2**31), 2**31 - 1))


def assert_clean(error: grpc.RpcError) -> None:
    code = error.code()  # type: ignore[attr-defined]
    assert code in CLEAN, f"{code}: {error.details()}"  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    reasons = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reasons.append(info.reason)
    assert reasons and all(reasons), "no ErrorInfo reason"
    assert status.message, "no message"


@PROPERTY
@given(model=models, prompt=st.text(max_size=40), preference=preferences, constraints=constraints(),
       options=options())
def test_generate_ends_with_a_completion_or_a_clean_error(target: str, model: str, prompt: str, preference: int,
                                                           constraints: pb.Constraints,
                                                           options: pb.GenerationOptions) -> None:
    request = pb.GenerateRequest(model=model, prompt=prompt, preference=preference, constraints=constraints,
                                 options=options)
    with grpc.insecure_channel(target) as channel:
        responses: list[Any] = []
        try:
            responses.extend(pb_grpc.RouterServiceStub(channel).Generate(request, timeout=DEADLINE_S))
        except grpc.RpcError as error:
            assert_clean(error)
            return
    assert responses[0].HasField("decision") and responses[0].decision.variant
    assert responses[-1].HasField("completion")
    assert all(r.HasField("chunk") for r in responses[1:-1] if not r.HasField("decision"))
    completion = responses[-1].completion
    assert completion.variant.startswith(FAMILY) and math.isfinite(completion.tokens_per_second)


@PROPERTY
@given(model=models, prompt=st.text(max_size=200), preference=preferences, constraints=constraints(),
       options=options())
def test_route_answers_a_decision_or_a_clean_error(target: str, model: str, prompt: str, preference: int,
                                                   constraints: pb.Constraints, options: pb.GenerationOptions) -> None:
    request = pb.RouteRequest(model=model, prompt=prompt, preference=preference, constraints=constraints,
                              options=options)
    with grpc.insecure_channel(target) as channel:
        try:
            response = pb_grpc.RouterServiceStub(channel).Route(request, timeout=DEADLINE_S)
        except grpc.RpcError as error:
            assert_clean(error)
            return
    decision = response.decision
    assert decision.variant.startswith(FAMILY) and decision.candidates
    assert all(math.isfinite(c.tokens_per_second) for c in decision.candidates)
