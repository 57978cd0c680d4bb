"""What the picker reads from HTTP bodies and headers (pure functions, tables)."""

from __future__ import annotations

import json
from http import HTTPStatus

import pytest

from quantrouter.gateway.inference import BODY_CHUNK_BYTES, HttpRefusal, read_call, rewritten_body
from quantrouter.v1 import router_service_pb2 as pb

LIMIT = 1 << 20


def _call(path: str, body: dict[str, object], headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return read_call(path, json.dumps(body).encode(), headers or {}, LIMIT)


@pytest.mark.parametrize(("model", "headers", "family", "preference"), [
    ("gemma3:270m", {}, "gemma3:270m", pb.PREFERENCE_UNSPECIFIED),
    ("gemma3:270m+latency", {}, "gemma3:270m", pb.PREFERENCE_LATENCY),
    ("gemma3:270m+quality", {"x-quantrouter-preference": "latency"}, "gemma3:270m", pb.PREFERENCE_LATENCY),
    ("gemma3:270m-q8_0", {"x-quantrouter-preference": "Quality"}, "gemma3:270m-q8_0", pb.PREFERENCE_QUALITY),
])
def test_preference_from_header_over_model_suffix(model: str, headers: dict[str, str], family: str,
                                                  preference: int) -> None:
    call = _call("/api/generate", {"model": model, "prompt": "hi"}, headers)
    assert (call.request.model, call.request.preference) == (family, preference)


def test_openai_fields_and_slo_headers_become_the_routing_request() -> None:
    call = _call("/v1/chat/completions", {
        "model": "gemma3:270m", "max_tokens": 12, "temperature": 0.5, "stop": "END",
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
        {"x-slo-ttft-ms": "250", "x-slo-tpot-ms": "20", "x-quantrouter-min-tokens-per-second": "10",
         "x-quantrouter-min-quantization": "Q4_K_M", "x-quantrouter-allowed-quantizations": "q4_K_M, q8_0"})
    request = call.request
    assert isinstance(request, pb.ChatRequest)
    assert [(m.role, m.content) for m in request.messages] == [("system", "be brief"), ("user", "hi")]
    assert (request.options.num_predict, request.options.temperature, list(request.options.stop)) == (12, 0.5, ["END"])
    c = request.constraints
    assert c.min_tokens_per_second == 50.0  # 20 ms per token is 50 tok/s, above the explicit 10
    assert c.max_time_to_first_token.ToMilliseconds() == 250
    assert (c.min_quantization, list(c.allowed_quantizations)) == ("Q4_K_M", ["q4_K_M", "q8_0"])


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/api/generate", b"{not json", HTTPStatus.BAD_REQUEST, "not JSON"),
    ("/api/generate", b"[1]", HTTPStatus.BAD_REQUEST, "JSON object"),
    ("/api/chat", b'{"messages": []}', HTTPStatus.BAD_REQUEST, "model is required"),
    ("/api/chat", b'{"model": "m", "messages": "hi"}', HTTPStatus.BAD_REQUEST, "messages"),
    ("/api/generate", b'{"model": "m+soon", "prompt": "hi"}', HTTPStatus.BAD_REQUEST, "preference suffix"),
    ("/api/generate", b'{"model": "m", "prompt": "hi", "options": {"num_predict": "ten"}}',
     HTTPStatus.BAD_REQUEST, "options"),
    ("/api/embed", b'{"model": "m"}', HTTPStatus.NOT_FOUND, "not an inference API"),
    ("/api/generate", b'{"model": "m", "prompt": "' + b"x" * LIMIT + b'"}', HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
     "over the limit"),
])
def test_bad_requests_are_refused_with_a_status_and_a_reason(path: str, body: bytes, status: HTTPStatus,
                                                             words: str) -> None:
    with pytest.raises(HttpRefusal) as refused:
        read_call(path, body, {"x-slo-ttft-ms": "100"}, LIMIT)
    assert refused.value.status == status and words in refused.value.message


def test_bad_headers_are_refused() -> None:
    for headers in ({"x-slo-ttft-ms": "soon"}, {"x-slo-tpot-ms": "-1"}, {"x-quantrouter-preference": "cheap"}):
        with pytest.raises(HttpRefusal, match="header"):
            _call("/api/generate", {"model": "m", "prompt": "hi"}, headers)


def test_rewritten_body_keeps_every_field_and_splits_at_the_envoy_limit() -> None:
    padding = "é" * BODY_CHUNK_BYTES  # two bytes each in UTF-8: the body spans three chunks
    call = _call("/api/generate", {"model": "gemma3:270m+latency", "prompt": "hi", "extra": padding})
    chunks = rewritten_body(call, "gemma3:270m-q4_K_M")
    assert len(chunks) == 3 and all(len(c) <= BODY_CHUNK_BYTES for c in chunks)
    body = json.loads(b"".join(chunks))
    assert body == {"model": "gemma3:270m-q4_K_M", "prompt": "hi", "extra": padding}
