"""Residency, keep_alive, eviction, queueing and disconnects of the embedded backend, seen through
`/api/ps` with the official `ollama` client, as Ollama's scheduler behaves (docs/ollama.md §3)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from pathlib import Path

import ollama
import pytest

from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, LadderEntry, run_embedded_in_thread
from tests.embedded.conftest import QUEUE_LIMIT
from tests.hardening.helpers import LONG_PROMPT

# Greedy, q4_0 answers LONG_PROMPT without an end of turn, so the model stays busy until the client leaves.
LONG = {"num_predict": 6000, "num_ctx": 8192, "temperature": 0}
# Without a working cancel the queued request waits for the rest of those 6000 tokens; it is allowed this share
# of that time, at the speed the long answer is decoding at on this machine, timed over at least `TIMED_S` and
# `TIMED_TOKENS`: over 16 tokens alone a fast machine's window was tens of ms, where a few ms of chunks arriving
# together read as a far higher speed (and a far shorter allowance).
STOP_SHARE = 0.25
TIMED_TOKENS = 16
TIMED_S = 1.0
SHORT_SAME_CTX = {"num_predict": 2, "num_ctx": 8192}
PS_FIELDS = {"model": str, "name": str, "digest": str, "expires_at": datetime, "size": int, "size_vram": int,
             "context_length": int}
DEFAULT_NUM_CTX = 2048
# Bounds a wait for the backend's own queue, never the speed: a load and two tokens took far longer than a
# quiet machine's second on two cores shared with other suites.
MODEL_LOAD_AND_TOKENS_S = 30.0
POLL_S = 0.01
TINY_BUDGET = 512 << 20


def _resident(server: EmbeddedServer) -> list[str]:
    with ollama.Client(host=server.url) as client:
        return [m.model or "" for m in client.ps().models]


def _load(client: ollama.Client, model: str, **kwargs: object) -> ollama.GenerateResponse:
    return client.generate(model=model, prompt="", **kwargs)  # type: ignore[arg-type]


def test_ps_reports_a_resident_model_like_ollama(server: EmbeddedServer) -> None:
    model = "gemma3:270m-q6_K"
    with ollama.Client(host=server.url) as client:
        loaded = _load(client, model, keep_alive="10m")
        listed = {m.model: m for m in client.ps().models}[model]
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    for name, kind in PS_FIELDS.items():
        assert isinstance(getattr(listed, name), kind), name
    assert listed.size == listed.size_vram > 0  # the budget plays the GPU: everything is "in VRAM"
    assert listed.context_length == DEFAULT_NUM_CTX
    assert listed.expires_at is not None
    remaining = listed.expires_at - datetime.now().astimezone()
    assert timedelta(minutes=9) < remaining <= timedelta(minutes=10)
    assert server.free_bytes() <= server.memory_budget_bytes - listed.size


def test_keep_alive_zero_unloads_after_the_request(server: EmbeddedServer) -> None:
    model = "gemma3:270m-q3_K_M"
    with ollama.Client(host=server.url) as client:
        client.generate(model=model, prompt="Hi", options={"num_predict": 2}, keep_alive=0)
    assert model not in _resident(server)


def test_empty_prompt_with_keep_alive_zero_unloads(server: EmbeddedServer) -> None:
    model = "gemma3:270m-q2_K"
    with ollama.Client(host=server.url) as client:
        _load(client, model)
        assert model in _resident(server)
        unloaded = _load(client, model, keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert model not in _resident(server)


def test_other_num_ctx_reloads_the_model(server: EmbeddedServer) -> None:
    model = "gemma3:270m-q5_K_M"
    with ollama.Client(host=server.url) as client:
        client.generate(model=model, prompt="Hi", options={"num_predict": 2, "num_ctx": 1024})
        first = {m.model: m.context_length for m in client.ps().models}[model]
        client.generate(model=model, prompt="Hi", options={"num_predict": 2, "num_ctx": 512})
        second = {m.model: m.context_length for m in client.ps().models}[model]
    assert (first, second) == (1024, 512)


def test_eviction_is_least_recently_used(small_server: EmbeddedServer) -> None:
    with ollama.Client(host=small_server.url) as client:
        _load(client, "gemma3:270m-q4_K_M")
        _load(client, "gemma3:270m-q4_0")
        assert set(_resident(small_server)) == {"gemma3:270m-q4_K_M", "gemma3:270m-q4_0"}
        _load(client, "gemma3:270m-q8_0")  # does not fit beside both: the older one goes
        assert set(_resident(small_server)) == {"gemma3:270m-q4_0", "gemma3:270m-q8_0"}
        _load(client, "gemma3:270m-f16")  # fits the budget alone, so both others go
        assert _resident(small_server) == ["gemma3:270m-f16"]


def test_a_load_that_can_never_fit_is_a_500(cache_dir: Path, ladder: list[LadderEntry]) -> None:
    # Below the smallest rung (Q2_K ≈ 775 MiB with its compute buffer at num_ctx 2048).
    config = EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=TINY_BUDGET)
    with run_embedded_in_thread(config) as tiny, ollama.Client(host=tiny.url) as client, \
            pytest.raises(ollama.ResponseError) as raised:
        client.generate(model="gemma3:270m-q2_K", prompt="Hi")
    assert raised.value.status_code == 500
    assert "memory budget" in raised.value.error


async def test_full_queue_is_503_and_a_disconnect_frees_the_model(server: EmbeddedServer) -> None:
    model = "gemma3:270m-q4_0"
    async with ollama.AsyncClient(host=server.url) as running, ollama.AsyncClient(host=server.url) as other:
        stream = await running.generate(model=model, prompt=LONG_PROMPT, stream=True, options=LONG)
        first = await anext(stream)  # the model is now busy generating up to 6000 tokens
        assert first.response
        timed, timed_from = 0, time.monotonic()
        while timed < TIMED_TOKENS or time.monotonic() - timed_from < TIMED_S:
            await anext(stream)
            timed += 1
        tokens_per_second = timed / (time.monotonic() - timed_from)
        queued = asyncio.ensure_future(other.generate(model=model, prompt="Hi", options=SHORT_SAME_CTX))
        deadline = time.monotonic() + MODEL_LOAD_AND_TOKENS_S
        while server.queued(model) < QUEUE_LIMIT:  # full once the backend holds this one
            assert time.monotonic() < deadline, "the second request never reached the backend's queue"
            await asyncio.sleep(POLL_S)
        with pytest.raises(ollama.ResponseError) as raised:
            await other.generate(model=model, prompt="Hi", options=SHORT_SAME_CTX)
        assert raised.value.status_code == 503
        assert raised.value.error == "server busy, please try again.  maximum pending requests exceeded"
        await stream.aclose()  # the client leaves mid-stream: its generation must stop at once
        await running.close()
        rest = (LONG["num_predict"] - 1 - timed) / tokens_per_second  # what a broken cancel waits for
        try:
            answer = await asyncio.wait_for(queued, STOP_SHARE * rest)
        except TimeoutError:
            raise AssertionError(f"the queued request waited over {STOP_SHARE * rest:.1f} s: the abandoned "
                                 f"generation went on ({tokens_per_second:.0f} tok/s)") from None
    assert answer.done
