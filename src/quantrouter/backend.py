"""Ollama over the official `ollama.AsyncClient`: catalog calls, streamed generation, error translation.

This is where `ollama`, `httpx` and `aiohttp` errors become ours: `translated` turns them into the
quantrouter.errors tree in one place (the quantization tools reuse it for `create` and `logprobs`).
Streamed responses are read by `_BatchingClient`: the `ollama` client builds every request, aiohttp carries
the streamed ones, and each read off the socket becomes one batch of plain dicts, so the text of the chunks
that arrived together leaves as one piece (one gRPC message, not one per token) and no pydantic model is
built per chunk. Nothing is read before the consumer asks for the next piece, so a cancelled gRPC call
closes the HTTP response (in a `finally`) and Ollama stops generating.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from json import JSONDecodeError, loads
from typing import Any, Literal, Protocol, cast

import aiohttp
import httpx
import ollama

from quantrouter.catalog import Architecture
from quantrouter.config import BackendSettings
from quantrouter.errors import (
    BackendBusy,
    BackendError,
    BackendFailed,
    BackendModelMissing,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)

__all__ = ["Backend", "Final", "ListedModel", "OllamaBackend", "ResidentModel", "ShownModel", "Text", "ollama_client",
           "translated"]

# An idle streaming connection closes after this long (aiohttp's pool checks about this often, too).
STREAM_KEEPALIVE_S = 5.0
# Ollama answers 503 when its queue is full (server/sched.go ErrMaxQueue); clients should back off.
BUSY_RETRY_AFTER_S = 1.0
# A request body goes out in one piece; this only bounds a stalled socket.
WRITE_TIMEOUT_S = 30.0


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


@dataclass(frozen=True, slots=True)
class Text:
    """Generated text as it arrived: `chunks` of Ollama's NDJSON chunks (about a token each) joined."""

    text: str
    chunks: int


class Backend(Protocol):
    """What the router and its inventory ask of a backend; `OllamaBackend` is the one in production.

    Errors leave as the quantrouter.errors tree (`BackendError` and below), never as a library's own.
    """

    async def list_models(self) -> list[ListedModel]: ...

    async def show(self, tag: str) -> ShownModel: ...

    async def ps(self) -> list[ResidentModel]: ...

    def generate(self, tag: str, prompt: str, system: str, options: Mapping[str, Any],
                 format: str = "") -> AsyncGenerator[Text | Final, None]:
        """Text as the backend produces it, then one `Final`."""
        ...

    def chat(self, tag: str, messages: Sequence[Mapping[str, str]], options: Mapping[str, Any],
             format: str = "") -> AsyncGenerator[Text | Final, None]: ...


@contextmanager
def translated(tag: str = "", started: bool = False) -> Iterator[None]:
    """Map the client's exceptions to ours (docs/ollama.md §2: how each one surfaces)."""
    try:
        yield
    except ollama.ResponseError as error:
        raise _from_response(error, tag, started) from None
    except (ConnectionError, httpx.ConnectError, aiohttp.ClientConnectorError) as error:
        raise _mark(BackendUnavailable(f"the backend is unreachable: {error}"), started) from None
    except (httpx.TimeoutException, aiohttp.ServerTimeoutError) as error:
        raise _mark(BackendTimeout(f"the backend did not answer in time ({type(error).__name__})"),
                    started) from None
    except (httpx.TransportError, aiohttp.ClientError, JSONDecodeError) as error:
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


def _final(part: Mapping[str, Any]) -> Final:
    def count(key: str) -> int:
        return int(part.get(key) or 0)

    return Final(part.get("done_reason") or "", count("prompt_eval_count"), count("prompt_eval_duration"),
                 count("eval_count"), count("eval_duration"), count("load_duration"), count("total_duration"))


def _generated_text(part: Mapping[str, Any]) -> str:
    return str(part.get("response") or "")


def _chat_text(part: Mapping[str, Any]) -> str:
    return str((part.get("message") or {}).get("content") or "")


# What a streamed call of `_BatchingClient` returns (its `generate` and `chat` are typed for the client's own).
_Batches = AsyncIterator[list[dict[str, Any]]]


class _BatchingClient(ollama.AsyncClient):
    """`ollama.AsyncClient` whose streamed calls go over aiohttp and yield lists of parsed NDJSON chunks.

    The client builds every request (its body, its headers); non-streamed calls are its own, over httpx. A
    streamed one is sent with aiohttp instead: its C HTTP parser and pool cost about a quarter of httpx's CPU
    per request and per chunk (measured: bench/results/overhead.md). Each read hands over everything that has
    arrived (`iter_any`), which is split into lines and parsed with `json`, so the chunks that came together
    leave as one batch and no pydantic model is built per chunk. Nothing is read before the consumer asks, so
    a consumer that stops closes the response, and with it the connection: Ollama stops generating.
    """

    def __init__(self, host: str, timeout: httpx.Timeout, **kwargs: Any) -> None:
        super().__init__(host=host, timeout=timeout, **kwargs)
        self._base_url = str(self._client.base_url).rstrip("/")
        self._headers = dict(self._client.headers)
        self._stream_timeout = aiohttp.ClientTimeout(sock_connect=timeout.connect, sock_read=timeout.read)
        self._session: aiohttp.ClientSession | None = None

    def _streams(self) -> aiohttp.ClientSession:
        """Made at the first stream, inside the running loop (aiohttp binds a session to it)."""
        if self._session is None:
            # No limit: the router's max_in_flight bounds the streams. No proxy or netrc from the environment
            # (aiohttp looks each up per request in a worker thread, two executor hops before every stream),
            # and none for the client's own calls either (`ollama_client`), so that all reach the same host.
            self._session = aiohttp.ClientSession(
                timeout=self._stream_timeout, trust_env=False,
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=STREAM_KEEPALIVE_S))
        return self._session

    async def close(self) -> None:
        await super().close()  # type: ignore[no-untyped-call]
        if self._session is not None:
            await self._session.close()

    async def _request(self, cls: Any, *args: Any, stream: bool = False, **kwargs: Any) -> Any:
        if not stream:
            return await super()._request(cls, *args, stream=False, **kwargs)
        return self._batches(*args, **kwargs)

    async def _batches(self, method: str, path: str, *, json: Any) -> _Batches:
        """The client streams only `generate` and `chat` (and `pull`, `push`, `create`, unused by the router),
        each a method, a path and a JSON body."""
        async with self._streams().request(method, self._base_url + path, json=json,
                                           headers=self._headers) as response:
            if response.status >= 400:
                raise ollama.ResponseError(await response.text(), response.status)
            pending = b""
            async for data in response.content.iter_any():
                *lines, pending = (pending + data).split(b"\n")
                parts = [loads(line) for line in lines if line.strip()]
                for part in parts:
                    if error := part.get("error"):
                        raise ollama.ResponseError(error)
                if parts:
                    yield parts
            if pending.strip():
                raise JSONDecodeError("the stream ended inside a line", pending.decode(errors="replace"), 0)


def _format(text: str) -> Literal["", "json"] | None:
    """Ollama takes "json" (or a schema); the router passes only "json" or nothing."""
    return "json" if text == "json" else None


def ollama_client(settings: BackendSettings,
                  kind: type[ollama.AsyncClient] = ollama.AsyncClient) -> ollama.AsyncClient:
    """The one way an `ollama.AsyncClient` (or the router's subclass) is built: the configured host, with
    explicit timeouts."""
    timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout, write=WRITE_TIMEOUT_S,
                            pool=settings.connect_timeout)
    # httpx's default pool (100 connections) would queue streams past 100 and time them out after `pool`
    # seconds; the router's max_in_flight already bounds how many streams are open.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # Certificates only for https: loading the CA bundle costs every process ~0.7 MiB for plain http. No proxy
    # from the environment, as for the streamed calls (`_BatchingClient`): every call goes straight to the host.
    return kind(host=settings.host, timeout=timeout, limits=limits, verify=settings.host.startswith("https://"),
                trust_env=False)


class OllamaBackend:
    """A small typed facade over `ollama.AsyncClient` with explicit timeouts."""

    def __init__(self, settings: BackendSettings) -> None:
        self.host = settings.host
        self._client = ollama_client(settings, _BatchingClient)
        self._keep_alive = settings.keep_alive

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
                       format: str = "") -> AsyncGenerator[Text | Final, None]:
        """Text as Ollama produces it (the chunks that arrived together as one piece), then one `Final`."""
        with translated(tag):
            parts = cast(_Batches, await self._client.generate(
                model=tag, prompt=prompt, system=system, options=dict(options), stream=True,
                keep_alive=self._keep_alive, format=_format(format)))
        async for item in self._relay(tag, parts, _generated_text):
            yield item

    async def chat(self, tag: str, messages: Sequence[Mapping[str, str]], options: Mapping[str, Any],
                   format: str = "") -> AsyncGenerator[Text | Final, None]:
        with translated(tag):
            parts = cast(_Batches, await self._client.chat(
                model=tag, messages=[dict(m) for m in messages], options=dict(options), stream=True,
                keep_alive=self._keep_alive, format=_format(format)))
        async for item in self._relay(tag, parts, _chat_text):
            yield item

    @staticmethod
    async def _relay(tag: str, batches: _Batches,
                     text_of: Callable[[Mapping[str, Any]], str]) -> AsyncIterator[Text | Final]:
        """Text, then the `Final`; then the body's end is read too (it follows the final chunk at once), so
        the connection goes back to the pool instead of a new one being opened for the next request."""
        started = done = False
        try:
            while True:
                with translated(tag, started):
                    try:
                        batch = await anext(batches)
                    except StopAsyncIteration:
                        break
                if done:
                    continue
                final = next((part for part in batch if part.get("done")), None)
                texts = [text for part in batch if not part.get("done") and (text := text_of(part))]
                if texts:
                    started = True
                    yield Text("".join(texts), len(texts))
                if final is not None:
                    done = True
                    yield _final(final)
            if not done:
                raise _mark(BackendFailed("the backend closed the stream without a final chunk"), started)
        finally:
            await batches.aclose()  # type: ignore[attr-defined]
