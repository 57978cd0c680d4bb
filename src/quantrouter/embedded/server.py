"""The Ollama-compatible HTTP server (aiohttp) over the scheduler and the llama.cpp engine.

Routes and their shapes follow ollama/ollama `server/routes.go` and `docs/api.md`
(docs/ollama.md §1). llama.cpp work runs in worker threads; the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

import quantrouter.embedded.engine as engine
import quantrouter.embedded.openai as openai
import quantrouter.embedded.wire as wire
from quantrouter.background import service_in_thread
from quantrouter.embedded.errors import BadRequestError, EmbeddedError, ModelNotFoundError
from quantrouter.embedded.exchange import Exchange
from quantrouter.embedded.ladder import prepare_ladder
from quantrouter.embedded.registry import ModelEntry, Registry
from quantrouter.embedded.scheduler import ResidentModel, Scheduler, parse_keep_alive
from quantrouter.units import GiB

__all__ = ["EmbeddedConfig", "EmbeddedServer", "run_embedded_in_thread"]

_log = logging.getLogger(__name__)
# The Ollama release whose API this server mirrors (docs/ollama.md, newest release).
OLLAMA_API_VERSION = "0.32.15"
# `GET /` body, verbatim from `server/routes.go`; clients use it as the liveness probe.
ROOT_TEXT = "Ollama is running"
DEFAULT_MAX_QUEUE = 8
DEFAULT_THREADS = 2
DEFAULT_NUM_CTX = 2048
DEFAULT_KEEP_ALIVE = "5m"
DEFAULT_DRAIN_S = 5.0
THREAD_START_TIMEOUT_S = 600.0
DONE_LOAD = "load"
DONE_UNLOAD = "unload"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class EmbeddedConfig:
    """How to run the embedded backend; the memory budget stands in for a GPU's VRAM."""

    cache_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    memory_budget_bytes: int = 2 * GiB
    model_dirs: tuple[Path, ...] = ()
    max_queue: int = DEFAULT_MAX_QUEUE
    n_threads: int = DEFAULT_THREADS
    default_num_ctx: int = DEFAULT_NUM_CTX
    default_keep_alive: str = DEFAULT_KEEP_ALIVE
    drain_seconds: float = DEFAULT_DRAIN_S


class EmbeddedServer:
    """`async with EmbeddedServer(config) as server:` serves the Ollama API at `server.url`."""

    def __init__(self, config: EmbeddedConfig) -> None:
        self.config = config
        self.memory_budget_bytes = config.memory_budget_bytes
        self.port = config.port
        self._runner: web.AppRunner | None = None
        self._registry = Registry(())
        self._scheduler = Scheduler(
            budget_bytes=config.memory_budget_bytes,
            max_queue=config.max_queue,
            default_keep_alive=parse_keep_alive(config.default_keep_alive),
            loader=functools.partial(_load, n_threads=config.n_threads),
            closer=engine.close_model,
        )

    @property
    def url(self) -> str:
        """Base URL for `ollama.Client(host=...)`."""
        return f"http://{self.config.host}:{self.port}"

    @property
    def registry(self) -> Registry:
        """The served models."""
        return self._registry

    def free_bytes(self) -> int:
        """Memory budget not held by resident models: what a static-capacity memory source reads."""
        return self._scheduler.free_bytes()

    def load_counts(self) -> tuple[int, int]:
        """Models loaded since start, and how many resident ones were evicted to make room."""
        return self._scheduler.loads, self._scheduler.evictions

    def resident(self) -> list[ResidentModel]:
        """Loaded models, as `/api/ps` lists them."""
        return self._scheduler.resident()

    def queued(self, name: str) -> int:
        """Requests waiting for model `name` (Ollama's pending queue, which `max_queue` bounds)."""
        return self._scheduler.queued(name)

    async def start(self) -> None:
        """Build the ladder if needed, then listen (port 0 → a free port, read back into `.port`)."""
        ladder = await asyncio.to_thread(prepare_ladder, self.config.cache_dir, progress=False)
        self._registry = await asyncio.to_thread(Registry.build, ladder, self.config.model_dirs)
        app = web.Application(middlewares=[_error_middleware])
        app.add_routes([
            web.get("/", self._root),
            web.get("/api/version", self._version),
            web.get("/api/tags", self._tags),
            web.get("/api/ps", self._ps),
            web.post("/api/show", self._show),
            web.post("/api/generate", self._generate),
            web.post("/api/chat", self._chat),
            web.delete("/api/delete", self._delete),
            *openai.routes(self),
        ])
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.config.drain_seconds)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        _log.info("embedded Ollama API at %s serving %d models", self.url, len(self._registry))

    async def stop(self) -> None:
        """Close the listener and in-flight requests, then unload every model."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._scheduler.close()

    async def __aenter__(self) -> EmbeddedServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.stop()

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text=ROOT_TEXT)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_API_VERSION})

    async def _tags(self, request: web.Request) -> web.Response:
        entries = sorted(self._registry, key=lambda e: e.modified_at, reverse=True)
        return web.json_response({"models": [wire.list_entry(e) for e in entries]})

    async def _ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [wire.ps_entry(m) for m in self._scheduler.resident()]})

    async def _show(self, request: web.Request) -> web.Response:
        data = wire.parse_body(await request.read())
        entry = self.entry(wire.require_model(data))
        verbose = bool(data.get("verbose"))
        model_info = await asyncio.to_thread(entry.info.model_info, verbose=verbose)
        return web.json_response({
            "license": "",
            "modelfile": f"# Modelfile generated by quantrouter embedded\nFROM {entry.path}\n",
            "parameters": "",
            "template": entry.info.chat_template or "",
            "details": entry.details(),
            "model_info": model_info,
            "capabilities": ["completion"],
            "modified_at": entry.modified_at.isoformat(),
        })

    async def _delete(self, request: web.Request) -> web.Response:
        """`DELETE /api/delete`: the tag leaves `/api/tags` at once, and memory once its request ends."""
        entry = self.entry(wire.require_model(wire.parse_body(await request.read())))
        self._registry.remove(entry.name)
        await self._scheduler.unload(entry)
        return web.Response()

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        data = wire.parse_body(await request.read())
        entry = self.entry(wire.require_model(data))
        prompt = data.get("prompt") or ""
        if not isinstance(prompt, str):
            raise BadRequestError("prompt must be a string")
        # A model imported without a template gets Ollama's plain-prompt default, so a base model
        # like the PyPI Gemma GGUF continues the text instead of imitating a chat it was not tuned for.
        raw = bool(data.get("raw")) or entry.info.chat_template is None
        messages = [] if raw else wire.prompt_messages(data.get("system"), prompt)
        system = data.get("system")
        raw_prompt = f"{system}\n\n{prompt}" if raw and isinstance(system, str) and system and prompt else prompt

        def shape(text: str) -> dict[str, Any]:
            return {"response": text}

        return await self._complete(request, data, entry, raw_prompt if raw else "", messages, shape,
                                    with_context=True)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        data = wire.parse_body(await request.read())
        entry = self.entry(wire.require_model(data))
        messages = data.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequestError("messages must be an array of objects")
        chat = [{"role": str(m.get("role", "")), "content": str(m.get("content") or "")} for m in messages]

        def shape(text: str) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": text}}

        return await self._complete(request, data, entry, "", chat, shape, with_context=False)

    async def _complete(self, request: web.Request, data: dict[str, Any], entry: ModelEntry, raw_prompt: str,
                        messages: list[dict[str, str]],
                        shape: Callable[[str], dict[str, Any]], *, with_context: bool) -> web.StreamResponse:
        """Generate and chat share everything but the prompt and the shape of a text chunk.

        Only /api/generate returns the (deprecated) token `context`.
        """
        exchange = Exchange(request, stream=data.get("stream", True) is not False,
                            started_ns=time.perf_counter_ns())
        options = wire.parse_options(data, entry, self.config.default_num_ctx)
        base = {"model": entry.name}
        if not raw_prompt and not messages:
            return await self._load_or_unload(entry, options, base, shape)

        def piece(text: str) -> dict[str, Any]:
            return {**base, "created_at": wire.now_rfc3339(), **shape(text), "done": False}

        result, load_ns = await self.generate(exchange, entry, raw_prompt, messages, options, piece)
        if result is None:
            return exchange.abandoned()
        final = {**base, "created_at": wire.now_rfc3339(),
                 **shape("" if exchange.stream else "".join(exchange.texts)),
                 "done": True, "done_reason": result.done_reason,
                 **({"context": list(result.context)} if with_context else {}),
                 **wire.final_metrics(result, time.perf_counter_ns() - exchange.started_ns,
                                      load_ns)}
        if not exchange.stream:
            return web.json_response(final)
        return await exchange.end(final)

    async def _load_or_unload(self, entry: ModelEntry, options: wire.RequestOptions, base: dict[str, Any],
                              shape: Callable[[str], dict[str, Any]]) -> web.Response:
        """An empty prompt only loads the model; with keep_alive 0 it unloads it (`routes.go`)."""
        if options.keep_alive == 0:
            await self._scheduler.unload(entry)
            reason = DONE_UNLOAD
        else:
            async with self._scheduler.acquire(entry, options.num_ctx, options.keep_alive):
                reason = DONE_LOAD
        return web.json_response({**base, "created_at": wire.now_rfc3339(), **shape(""), "done": True,
                                  "done_reason": reason})

    async def generate(self, exchange: Exchange, entry: ModelEntry, raw_prompt: str, messages: list[dict[str, str]],
                       options: wire.RequestOptions, piece: Callable[[str], dict[str, Any]],
                       ) -> tuple[engine.GenerationResult | None, int]:
        """Generate on `entry`, streaming each text as `piece(text)` when the exchange streams; the result
        (None when the client left) and the load time in ns. The HTTP APIs differ only in their shapes."""
        async with self._scheduler.acquire(entry, options.num_ctx, options.keep_alive) as lease:
            result = await self._run(exchange, lease.model, entry, raw_prompt, messages, options, piece)
        return result, lease.load_duration_ns

    async def _run(self, exchange: Exchange, model: Any, entry: ModelEntry, raw_prompt: str,
                   messages: list[dict[str, str]], options: wire.RequestOptions,
                   piece: Callable[[str], dict[str, Any]]) -> engine.GenerationResult | None:
        """Stream tokens from the worker thread to the client; None when the client went away."""
        prompt = raw_prompt
        if messages:
            prompt = await asyncio.to_thread(engine.render_chat, model, entry.info.chat_template,
                                           entry.info.architecture, messages)
        loop = asyncio.get_running_loop()
        texts: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(texts.put_nowait, text)

        worker = asyncio.ensure_future(
            asyncio.to_thread(engine.generate, model, prompt, options.sampling, on_text, cancel))
        worker.add_done_callback(lambda _: texts.put_nowait(None))
        try:
            while (text := await texts.get()) is not None:
                if exchange.client_gone:
                    _log.info("client left; stopping generation on %s", entry.name)
                    return None
                exchange.texts.append(text)
                if exchange.stream:
                    await exchange.send(piece(text))
            return await worker
        except EmbeddedError as error:
            if exchange.response is None:
                raise
            await exchange.send({"error": error.message})  # mid-stream: the status is already sent
            return None
        except ConnectionResetError:
            return None
        finally:
            cancel.set()
            await _outlast(worker)

    def entry(self, name: str) -> ModelEntry:
        """The served model of this name, or 404."""
        entry = self._registry.get(name)
        if entry is None:
            raise ModelNotFoundError(name)
        return entry


async def _outlast(worker: asyncio.Future[Any]) -> None:
    """Wait until the decoding thread lets go of the model, however often this task is cancelled meanwhile
    (a server stopping cancels its handlers, maybe twice): freeing a model under llama.cpp's decode loop is
    a segfault. The thread stops at its next token, as `cancel` is set; a cancellation is re-raised after."""
    cancelled = False
    while not worker.done():
        try:
            await asyncio.wait({worker})  # neither raises the worker's error nor cancels it
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _load(entry: ModelEntry, num_ctx: int, *, n_threads: int) -> tuple[Any, int]:
    loaded = engine.load_model(entry, num_ctx, n_threads)
    return loaded.llama, loaded.allocation.total


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes Ollama's `{"error": "..."}` body with its status."""
    try:
        return await handler(request)
    except EmbeddedError as error:
        return web.json_response({"error": error.message}, status=error.status)
    except web.HTTPException as error:
        if error.status < HTTPStatus.BAD_REQUEST:
            raise
        return web.json_response({"error": error.reason.lower()}, status=error.status)


@contextlib.contextmanager
def run_embedded_in_thread(config: EmbeddedConfig) -> Iterator[EmbeddedServer]:
    """Serve on a private event loop in a daemon thread, e.g. one backend for a whole pytest session."""

    async def started() -> EmbeddedServer:
        server = EmbeddedServer(config)
        await server.start()
        return server

    async def stop(server: EmbeddedServer) -> None:
        await server.stop()

    with service_in_thread(started, stop, name="quantrouter-embedded",
                           start_timeout=THREAD_START_TIMEOUT_S) as server:
        yield server
