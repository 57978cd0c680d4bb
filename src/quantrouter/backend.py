"""Ollama over the official `ollama.AsyncClient`: catalog calls, streamed generation, error translation.

This is where `ollama` and `httpx` errors become ours: `translated` turns them into the
quantrouter.errors tree in one place (the quantization tools reuse it for `create` and `logprobs`).
Streams are relayed chunk by chunk and closed in a `finally`, so a cancelled gRPC call closes the
HTTP response and Ollama stops generating.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import ollama

from quantrouter.catalog import Architecture
from quantrouter.errors import (
    BackendBusy,
    BackendError,
    BackendFailed,
    BackendModelMissing,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)

__all__ = ["Final", "ListedModel", "OllamaBackend", "ResidentModel", "ShownModel", "translated"]

# Ollama answers 503 when its queue is full (server/sched.go ErrMaxQueue); clients should back off.
BUSY_RETRY_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class ListedModel:
    """One entry of `/api/tags`."""

    tag: str
    size_bytes: int
    quantization_level: str
    family: str
    parameter_size: str


@dataclass(frozen=True, slots=True)
class ShownModel:
    """What `/api/show` adds: the architecture for the KV estimate and the parameter count."""

    architecture: Architecture | None
    parameter_count: int


@dataclass(frozen=True, slots=True)
class ResidentModel:
    """One entry of `/api/ps`."""

    tag: str
    size_bytes: int
    size_vram: int
    context_length: int


@dataclass(frozen=True, slots=True)
class Final:
    """Ollama's last chunk: why it stopped and its measured figures (durations in ns)."""

    done_reason: str
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int
    load_duration: int
    total_duration: int


@contextmanager
def translated(tag: str = "", started: bool = False) -> Iterator[None]:
    """Map the client's exceptions to ours (reference/ollama.md §2: how each one surfaces)."""
    try:
        yield
    except ollama.ResponseError as error:
        raise _from_response(error, tag, started) from None
    except (ConnectionError, httpx.ConnectError) as error:
        raise _mark(BackendUnavailable(f"the backend is unreachable: {error}"), started) from None
    except httpx.TimeoutException as error:
        raise _mark(BackendTimeout(f"the backend did not answer in time ({type(error).__name__})"),
                    started) from None
    except (httpx.TransportError, json.JSONDecodeError) as error:
        raise _mark(BackendFailed(f"the backend connection broke: {type(error).__name__}: {error}"),
                    started) from None


def _mark(error: BackendError, started: bool) -> BackendError:
    error.started = started
    return error


def _from_response(error: ollama.ResponseError, tag: str, started: bool) -> BackendError:
    text = error.error
    status = error.status_code
    result: BackendError
    if status == 404:
        result = BackendModelMissing(f"the backend does not have {tag or 'the model'}: {text}",
                                     metadata={"variant": tag})
    elif status == 503:
        result = BackendBusy(f"the backend is busy: {text}", retry_after=BUSY_RETRY_AFTER_S)
    elif status == 400:
        result = BackendRejected(f"the backend rejected the request: {text}")
    elif status == -1:
        result = BackendFailed(f"the backend failed mid-stream: {text}")
    else:
        result = BackendFailed(f"the backend failed ({status}): {text}")
    return _mark(result, started)


def _architecture(info: Mapping[str, Any]) -> Architecture | None:
    arch = info.get("general.architecture")
    if not isinstance(arch, str):
        return None

    def number(key: str) -> int:
        value = info.get(f"{arch}.{key}")
        if isinstance(value, list):  # per-layer head counts: the largest bounds the cache
            value = max(value, default=0)
        return int(value) if isinstance(value, int | float) else 0

    heads = number("attention.head_count")
    head_dim = number("attention.key_length") or (number("embedding_length") // heads if heads else 0)
    blocks = number("block_count")
    if not blocks or not head_dim:
        return None
    tokens = info.get("tokenizer.ggml.tokens")  # listed only by a verbose /api/show
    vocab = number("vocab_size") or (len(tokens) if isinstance(tokens, list) else 0)
    return Architecture(arch, blocks, number("attention.head_count_kv") or heads, head_dim,
                        number("context_length"), number("embedding_length"), heads, vocab)


def _final(part: Any) -> Final:
    return Final(part.done_reason or "", part.prompt_eval_count or 0, part.prompt_eval_duration or 0,
                 part.eval_count or 0, part.eval_duration or 0, part.load_duration or 0, part.total_duration or 0)


def _format(text: str) -> Literal["", "json"] | None:
    """Ollama takes "json" (or a schema); the router passes only "json" or nothing."""
    return "json" if text == "json" else None


class OllamaBackend:
    """A small typed facade over `ollama.AsyncClient` with explicit timeouts."""

    def __init__(self, host: str, connect_timeout: float, read_timeout: float, keep_alive: str) -> None:
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0, pool=connect_timeout)
        self.host = host
        # httpx's default pool (100 connections) would queue streams past 100 and time them out after `pool`
        # seconds; the router's max_in_flight already bounds how many streams are open.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = ollama.AsyncClient(host=host, timeout=timeout, limits=limits)
        self._keep_alive = keep_alive

    async def close(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]

    async def list_models(self) -> list[ListedModel]:
        with translated():
            listed = await self._client.list()
        result = []
        for m in listed.models:
            details = m.details
            result.append(ListedModel(
                m.model or "", int(m.size or 0),
                (details.quantization_level if details else None) or "",
                (details.family if details else None) or "",
                (details.parameter_size if details else None) or ""))
        return result

    async def show(self, tag: str) -> ShownModel:
        with translated(tag):
            shown = await self._client.show(tag)
        info: Mapping[str, Any] = shown.modelinfo or {}
        count = info.get("general.parameter_count")
        return ShownModel(_architecture(info), int(count) if isinstance(count, int | float) else 0)

    async def ps(self) -> list[ResidentModel]:
        with translated():
            running = await self._client.ps()
        return [ResidentModel(m.model or "", int(m.size or 0), int(m.size_vram or 0), int(m.context_length or 0))
                for m in running.models]

    async def generate(self, tag: str, prompt: str, system: str, options: Mapping[str, Any],
                       format: str = "") -> AsyncGenerator[str | Final, None]:
        """Text chunks as Ollama produces them, then one `Final`."""
        with translated(tag):
            parts = await self._client.generate(
                model=tag, prompt=prompt, system=system, options=dict(options), stream=True,
                keep_alive=self._keep_alive, format=_format(format))
        async for item in self._relay(tag, parts, lambda p: p.response or ""):
            yield item

    async def chat(self, tag: str, messages: Sequence[Mapping[str, str]], options: Mapping[str, Any],
                   format: str = "") -> AsyncGenerator[str | Final, None]:
        with translated(tag):
            parts = await self._client.chat(
                model=tag, messages=[dict(m) for m in messages], options=dict(options), stream=True,
                keep_alive=self._keep_alive, format=_format(format))
        async for item in self._relay(tag, parts, lambda p: (p.message.content if p.message else "") or ""):
            yield item

    @staticmethod
    async def _relay(tag: str, parts: AsyncIterator[Any], text_of: Any) -> AsyncIterator[str | Final]:
        started = False
        try:
            while True:
                with translated(tag, started):
                    try:
                        part = await anext(parts)
                    except StopAsyncIteration:
                        break
                if part.done:
                    yield _final(part)
                    return
                text = text_of(part)
                if text:
                    started = True
                    yield text
            raise _mark(BackendFailed("the backend closed the stream without a final chunk"), started)
        finally:
            await parts.aclose()  # type: ignore[attr-defined]
