"""The OpenAI-compatible API of the embedded backend, driven by the official `openai` client over real HTTP
with real llama.cpp tokens: chat and completions, whole and streamed (SSE), usage, errors in OpenAI's shape."""

from __future__ import annotations

import httpx
import openai
import pytest

from quantrouter.embedded import EmbeddedServer

MODEL = "gemma3:270m-q4_K_M"
MAX_TOKENS = 6


def _client(server: EmbeddedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_chat_completion_whole_has_openai_shape_and_usage(server: EmbeddedServer) -> None:
    with _client(server) as client:
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                                max_tokens=MAX_TOKENS, temperature=0, seed=1)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == MODEL and answer.system_fingerprint == "fp_ollama"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= MAX_TOKENS
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_completion_streamed_as_server_sent_events(server: EmbeddedServer) -> None:
    """Deltas as they are decoded, one finish_reason on the last choice, then usage when asked for."""
    with _client(server) as client:
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count: one, two,"}], max_tokens=MAX_TOKENS,
            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) and all(d.role == "assistant" for d in deltas)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in {"stop", "length"} and not any(finishes[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert len(deltas) - 1 <= usage.completion_tokens <= MAX_TOKENS  # one delta per token, then the final one


def test_completions_whole_and_streamed(server: EmbeddedServer) -> None:
    with _client(server) as client:
        whole = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=MAX_TOKENS, temperature=0)
        streamed = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True))
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-") and whole.choices[0].text
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= MAX_TOKENS
    assert all(c.object == "text_completion" for c in streamed)
    assert "".join(c.choices[0].text for c in streamed)
    assert streamed[-1].choices[0].finish_reason in {"stop", "length"}
    assert not any(c.choices[0].finish_reason for c in streamed[:-1])


def test_errors_have_openai_shape(server: EmbeddedServer) -> None:
    with _client(server) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="nope:1b", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as empty:
            client.chat.completions.create(model=MODEL, messages=[])
    assert missing.value.status_code == 404 and "nope:1b" in missing.value.message
    assert empty.value.status_code == 400 and "messages" in empty.value.message
    reply = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=10)
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
