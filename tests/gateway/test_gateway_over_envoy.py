"""HTTP clients through a real Envoy and the Endpoint Picker to three real nodes, driven as users would: the
official `ollama` and `openai` clients, and httpx where a test reads headers or raw bodies."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest

from quantrouter.config import parse_duration
from quantrouter.gateway.envoy import MESSAGE_TIMEOUT
from quantrouter.gateway.inference import BODY_CHUNK_BYTES
from tests.fleet.conftest import wait_for
from tests.gateway.conftest import PICKER_MAX_IN_FLIGHT, Gateway
from tests.support import FAMILY

SHORT = {"num_predict": 6, "temperature": 0}
TIMEOUT = httpx.Timeout(120, connect=5)


def _in_flight(gateway: Gateway) -> float:
    assert gateway.picker is not None
    return gateway.picker.registry.get_sample_value("quantrouter_gateway_in_flight_requests") or 0.0


def _generate(gateway: Gateway, model: str, headers: dict[str, str] | None = None, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": "Name a colour.", "stream": False, "options": SHORT, **extra}
    return httpx.post(f"{gateway.url}/api/generate", json=body, headers=headers or {}, timeout=TIMEOUT)


def test_ollama_client_streams_intact_answers_from_the_rewritten_variant(gateway: Gateway) -> None:
    with ollama.Client(host=gateway.url, timeout=120) as client:
        parts = list(client.generate(model=FAMILY, prompt="The sky is", options=SHORT, stream=True))
        chat = client.chat(model=FAMILY, messages=[{"role": "user", "content": "Hi"}], options=SHORT)
    final = parts[-1]
    assert final.done and final.eval_count and 0 < final.eval_count <= SHORT["num_predict"]
    assert "".join(p.response for p in parts).strip()
    tags = {p.model for p in parts}
    assert len(tags) == 1 and tags.pop().startswith(f"{FAMILY}-")  # the picker rewrote the family to a tag
    assert chat.message.content and chat.model.startswith(f"{FAMILY}-")


def test_decision_headers_name_the_variant_that_served(gateway: Gateway) -> None:
    with httpx.stream("POST", f"{gateway.url}/api/chat", timeout=TIMEOUT, json={
            "model": FAMILY, "messages": [{"role": "user", "content": "Hi"}], "options": SHORT}) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    variant = response.headers["x-quantrouter-variant"]
    assert {line["model"] for line in lines} == {variant}
    node = response.headers["x-quantrouter-node"]
    assert node in gateway.nodes and f"node {node}" in response.headers["x-quantrouter-reason"]
    assert lines[-1]["done"] is True


def test_preferences_by_header_and_model_suffix_pick_different_variants(gateway: Gateway) -> None:
    quality = _generate(gateway, f"{FAMILY}+quality")
    latency = _generate(gateway, FAMILY, {"x-quantrouter-preference": "latency"})
    assert quality.status_code == latency.status_code == 200
    best, fast = quality.headers["x-quantrouter-variant"], latency.headers["x-quantrouter-variant"]
    assert best != fast
    assert quality.json()["model"] == best and latency.json()["model"] == fast


def test_openai_client_streams_through_the_gateway(gateway: Gateway) -> None:
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                       default_headers={"x-quantrouter-preference": "latency"}) as client:
        chunks = list(client.chat.completions.create(model=FAMILY, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=6, temperature=0, stream=True))
        whole = client.completions.create(model=FAMILY, prompt="One, two,", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert {c.model for c in chunks} == {whole.model} and whole.model.startswith(f"{FAMILY}-")
    assert whole.choices[0].text


def test_bad_bodies_get_clean_json_errors_from_the_picker(gateway: Gateway) -> None:
    def post(path: str, content: bytes) -> httpx.Response:
        return httpx.post(f"{gateway.url}{path}", content=content, timeout=TIMEOUT)

    cases = {
        (b"{not json", "/api/generate"): (400, "not JSON"),
        (b'{"prompt": "hi"}', "/api/generate"): (400, "model is required"),
        (b'{"model": "gemma3:270m+fastest", "prompt": "hi"}', "/api/generate"): (400, "preference suffix"),
        (b'{"model": "nosuch:1b", "messages": [{"role": "user", "content": "hi"}]}', "/v1/chat/completions"):
            (404, "nosuch:1b"),
    }
    for (body, path), (status, words) in cases.items():
        answer = post(path, body)
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert words in answer.json()["error"]["message"]
    with ollama.Client(host=gateway.url) as client, pytest.raises(ollama.ResponseError) as refused:
        client.generate(model=FAMILY, prompt="hi", options={"num_predict": -5})
    assert refused.value.status_code == 400


def test_nothing_eligible_is_503_and_a_full_picker_sheds_with_429(gateway: Gateway) -> None:
    impossible = _generate(gateway, FAMILY, {"x-quantrouter-min-tokens-per-second": "1000000"})
    assert impossible.status_code == 503
    assert "tok/s" in impossible.json()["error"]["message"] or "tokens" in impossible.json()["error"]["message"]
    quality = {"x-quantrouter-preference": "quality"}  # to the large node, whose model server is held
    gateway.doorway.hold()
    try:
        with ThreadPoolExecutor(PICKER_MAX_IN_FLIGHT) as pool:
            waiting = [pool.submit(_generate, gateway, FAMILY, quality) for _ in range(PICKER_MAX_IN_FLIGHT)]
            wait_for(lambda: _in_flight(gateway) == PICKER_MAX_IN_FLIGHT, what="the held streams")
            shed = _generate(gateway, FAMILY)
            gateway.doorway.release()
            assert all(f.result().status_code == 200 for f in waiting)  # held, not lost
    finally:
        gateway.doorway.release()
    assert shed.status_code == 429 and shed.headers["retry-after"] == "1"
    assert "limit" in shed.json()["error"]["message"]


def test_a_body_over_62_kb_survives_the_chunking(gateway: Gateway) -> None:
    padding = "x" * (BODY_CHUNK_BYTES + 8_000)  # a field Ollama ignores, to make the body span two chunks
    answer = _generate(gateway, FAMILY, metadata={"padding": padding})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == answer.headers["x-quantrouter-variant"]
    assert answer.json()["eval_count"] > 0


def test_a_killed_backend_is_skipped_through_the_fallback_list(fallback_gateway: Gateway) -> None:
    """Quality wants F16, which the large node has most room for; its model server dies while its node router
    still reports it healthy, so Envoy must take the next endpoint of the picker's list, for the same variant."""
    gateway = fallback_gateway
    picked = _generate(gateway, FAMILY, {"x-quantrouter-preference": "quality"})
    assert picked.headers["x-quantrouter-node"] == "large"
    gateway.doorway.kill()
    try:
        answer = _generate(gateway, FAMILY, {"x-quantrouter-preference": "quality"})
    finally:
        gateway.doorway.revive()
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-quantrouter-node"] != "large"
    assert answer.headers["x-quantrouter-variant"] == picked.headers["x-quantrouter-variant"]
    assert answer.json()["model"] == answer.headers["x-quantrouter-variant"]


def test_a_restarting_picker_does_not_wedge_envoy(gateway: Gateway) -> None:
    """FailClose: while the picker is down Envoy answers at once with an error; once it is back, requests flow.

    "At once" is judged against what a wedged Envoy would wait, the picker's message timeout it was configured
    with: an answer in under half of it came from the failed connection, not from the timeout."""
    gateway.stop_picker()
    try:
        started = time.monotonic()
        down = _generate(gateway, FAMILY)
        took = time.monotonic() - started
    finally:
        gateway.start_picker()
    assert down.status_code >= 500
    assert took < parse_duration(MESSAGE_TIMEOUT) / 2, f"the error took {took:.1f} s, as long as a timeout"
    assert _generate(gateway, FAMILY).status_code == 200
