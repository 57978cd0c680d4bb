"""The Ollama API of the embedded backend, driven by the official `ollama` client, checked field by field
against the documented examples (docs/ollama.md §1–2): real HTTP, real llama.cpp tokens."""

from __future__ import annotations

import json
from datetime import datetime

import httpx
import ollama
import pytest

from quantrouter.embedded import EmbeddedServer, LadderEntry

MODEL = "gemma3:270m-q4_K_M"
SHORT = {"num_predict": 8, "temperature": 0, "seed": 1}
LADDER_TAGS = {"gemma3:270m-f16", "gemma3:270m-q8_0", "gemma3:270m-q6_K", "gemma3:270m-q5_K_M",
               "gemma3:270m-q4_K_M", "gemma3:270m-q4_0", "gemma3:270m-q3_K_M", "gemma3:270m-q2_K"}
DETAIL_FIELDS = {"parent_model": str, "format": str, "family": str, "families": list, "parameter_size": str,
                 "quantization_level": str}
METRIC_FIELDS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                 "eval_duration")


def _client(server: EmbeddedServer) -> ollama.Client:
    return ollama.Client(host=server.url)


def _assert_details(details: ollama.ModelDetails, quant: str) -> None:
    for name, kind in DETAIL_FIELDS.items():
        assert isinstance(getattr(details, name), kind), name
    assert (details.format, details.family, details.families) == ("gguf", "gemma3", ["gemma3"])
    assert details.parameter_size == "268.10M"  # format.HumanNumber of general.parameter_count
    assert details.quantization_level == quant


def _assert_final(part: ollama.GenerateResponse | ollama.ChatResponse, max_tokens: int) -> None:
    assert part.done is True
    assert part.done_reason in {"stop", "length"}
    for name in METRIC_FIELDS:
        value = getattr(part, name)
        assert isinstance(value, int) and value > 0, name
    assert part.eval_count is not None and part.eval_count <= max_tokens
    assert part.total_duration is not None and part.eval_duration is not None
    assert part.total_duration >= part.eval_duration
    assert datetime.fromisoformat(str(part.created_at)).tzinfo is not None


def test_list_names_the_ladder_with_metadata_details(server: EmbeddedServer, ladder: list[LadderEntry]) -> None:
    with _client(server) as client:
        models = {m.model: m for m in client.list().models}
    assert set(models) >= LADDER_TAGS
    for entry in ladder:
        listed = models[entry.tag]
        assert listed.size == entry.size
        assert listed.digest == entry.sha256
        assert isinstance(listed.modified_at, datetime) and listed.modified_at.tzinfo is not None
        assert listed.details is not None
        _assert_details(listed.details, entry.quant)


def test_show_reports_model_info_from_gguf_metadata(server: EmbeddedServer) -> None:
    with _client(server) as client:
        shown = client.show("gemma3:270m-q8_0")
    assert shown.details is not None
    _assert_details(shown.details, "Q8_0")
    info = shown.modelinfo
    assert info is not None
    assert info["general.architecture"] == "gemma3"
    assert info["general.file_type"] == 7  # LlamaFileType.MOSTLY_Q8_0
    assert info["general.parameter_count"] == 268_098_176
    assert info["gemma3.block_count"] == 18
    assert info["gemma3.attention.head_count"] == 4
    assert info["gemma3.attention.head_count_kv"] == 1
    assert info["gemma3.attention.key_length"] == info["gemma3.attention.value_length"] == 256
    assert info["gemma3.context_length"] == 32768
    assert info["gemma3.embedding_length"] == 640
    assert shown.capabilities == ["completion"]


def test_generate_returns_real_tokens_and_measured_stats(server: EmbeddedServer) -> None:
    with _client(server) as client:
        result = client.generate(model=MODEL, prompt="Name a colour.", options=SHORT)
    assert result.model == MODEL
    assert result.response.strip()
    _assert_final(result, SHORT["num_predict"])
    assert result.context  # generate (only) returns the token context


def test_generate_streams_token_by_token(server: EmbeddedServer) -> None:
    with _client(server) as client:
        parts = list(client.generate(model=MODEL, prompt="Count from one to ten.", stream=True,
                                     options={**SHORT, "num_predict": 12}))
    *chunks, final = parts
    assert len(chunks) >= 2  # one line per token, not one buffered answer
    for chunk in chunks:
        assert chunk.done is False and chunk.model == MODEL and chunk.response
        assert chunk.eval_count is None  # usage only on the final chunk
    assert final.response == ""
    _assert_final(final, 12)
    assert final.eval_count == len(chunks) or final.done_reason == "stop"


def test_greedy_generation_is_repeatable(server: EmbeddedServer) -> None:
    with _client(server) as client:
        first, second = (client.generate(model=MODEL, prompt="Say hello.", options=SHORT) for _ in range(2))
    assert first.response == second.response


def test_stop_sequence_ends_generation(server: EmbeddedServer) -> None:
    with _client(server) as client:
        free = client.generate(model=MODEL, prompt="Count from one to ten.", options={**SHORT, "num_predict": 16})
        word = free.response.split()[1]
        stopped = client.generate(model=MODEL, prompt="Count from one to ten.",
                                  options={**SHORT, "num_predict": 16, "stop": [word]})
    assert stopped.done_reason == "stop"
    assert word not in stopped.response
    assert free.response.startswith(stopped.response)


def test_format_json_holds_the_output_to_json(server: EmbeddedServer) -> None:
    with _client(server) as client:
        answer = client.generate(model=MODEL, prompt="A person as JSON:", format="json",
                                 options={**SHORT, "num_predict": 64})
    assert answer.response.lstrip().startswith(("{", "["))
    if answer.done_reason == "stop":  # finished inside the budget: the whole answer parses
        json.loads(answer.response)


def test_format_schema_holds_the_output_to_the_schema(server: EmbeddedServer) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    with _client(server) as client:
        answer = client.generate(model=MODEL, prompt="The capital of France as JSON:", format=schema,
                                 options={**SHORT, "num_predict": 48})
    assert answer.done_reason == "stop", answer.response
    assert set(json.loads(answer.response)) == {"city"}


def test_a_format_that_is_not_json_or_a_schema_is_400(server: EmbeddedServer) -> None:
    response = httpx.post(f"{server.url}/api/generate", json={"model": MODEL, "prompt": "hi", "format": "yaml"})
    assert response.status_code == 400
    assert "invalid format" in response.json()["error"]


async def test_chat_streams_through_the_chat_template(server: EmbeddedServer) -> None:
    async with ollama.AsyncClient(host=server.url) as client:
        stream = await client.chat(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], stream=True,
                                   options=SHORT)
        parts = [part async for part in stream]
    *chunks, final = parts
    assert chunks and all(c.message.role == "assistant" and not c.done for c in chunks)
    assert "".join(c.message.content or "" for c in chunks).strip()
    assert "<start_of_turn>" not in "".join(c.message.content or "" for c in chunks)
    assert final.message.content == ""
    _assert_final(final, SHORT["num_predict"])


async def test_chat_without_streaming_returns_one_message(server: EmbeddedServer) -> None:
    async with ollama.AsyncClient(host=server.url) as client:
        result = await client.chat(model=MODEL, options=SHORT, messages=[
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What colour is the sky?"}])
    assert result.message.role == "assistant" and result.message.content
    _assert_final(result, SHORT["num_predict"])


@pytest.mark.parametrize("call", ["generate", "chat", "show"])
def test_unknown_model_is_404(server: EmbeddedServer, call: str) -> None:
    with _client(server) as client, pytest.raises(ollama.ResponseError) as raised:
        if call == "generate":
            client.generate(model="missing:latest", prompt="hi")
        elif call == "chat":
            client.chat(model="missing:latest", messages=[{"role": "user", "content": "hi"}])
        else:
            client.show("missing:latest")
    assert raised.value.status_code == 404
    assert raised.value.error == "model 'missing:latest' not found"


def test_wrongly_typed_option_is_400(server: EmbeddedServer) -> None:
    with _client(server) as client, pytest.raises(ollama.ResponseError) as raised:
        client.generate(model=MODEL, prompt="hi", options={"stop": "x"})  # type: ignore[dict-item]
    assert raised.value.status_code == 400
    assert raised.value.error == 'option "stop" must be of type array'


@pytest.mark.parametrize(("body", "error"), [
    (b"", "missing request body"), (b"{not json", None), (b'{"prompt": "hi"}', "model is required")])
def test_bad_bodies_are_400(server: EmbeddedServer, body: bytes, error: str | None) -> None:
    """The ollama client validates these before sending, so they go through httpx, its transport."""
    with httpx.Client(base_url=server.url) as http:
        response = http.post("/api/generate", content=body)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    if error is not None:
        assert response.json()["error"] == error


def test_liveness_and_version(server: EmbeddedServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        root, head, version = http.get("/"), http.head("/"), http.get("/api/version")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert head.status_code == 200
    assert set(version.json()) == {"version"} and isinstance(version.json()["version"], str)
