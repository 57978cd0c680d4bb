"""`quantrouter embedded prepare | serve`: build the model ladder, run the Ollama-compatible server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

from quantrouter.config import ConfigError, Settings, parse_bytes
from quantrouter.embedded.ladder import prepare_ladder
from quantrouter.embedded.server import (
    DEFAULT_DRAIN_S,
    DEFAULT_MAX_QUEUE,
    DEFAULT_THREADS,
    EmbeddedConfig,
    EmbeddedServer,
)

__all__ = ["add_embedded_commands"]

DEFAULT_HOST = "127.0.0.1"
# Ollama's own port, so `ollama` tools and clients find it without configuration.
DEFAULT_PORT = 11434
EXIT_OK = 0
EXIT_USAGE = 2
MIB = 1 << 20


def add_embedded_commands(subparsers: Any) -> None:
    """Add `embedded prepare` and `embedded serve` to the quantrouter CLI's subparsers."""
    embedded = subparsers.add_parser(
        "embedded", help="the built-in Ollama-compatible backend (llama.cpp, Gemma 3 270M ladder)",
        description="An Ollama-compatible HTTP server over llama.cpp that serves Gemma 3 270M in eight "
                    "quantizations, for machines without Ollama or a GPU.")
    commands = embedded.add_subparsers(dest="embedded_command", required=True)

    prepare = commands.add_parser(
        "prepare", help="build and verify the quantization ladder (first run: a few minutes)",
        description="Dequantize the Gemma 3 270M Q4_K_M GGUF from PyPI to F16 and quantize it to F16, Q8_0, "
                    "Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M and Q2_K with llama.cpp. Files already built and "
                    "unchanged are skipped.")
    prepare.add_argument("--cache-dir", type=Path, help="where models are kept (default: settings.cache_dir)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.add_argument("--verify", action="store_true", help="re-hash every file against the manifest")
    prepare.set_defaults(func=_prepare)

    serve = commands.add_parser(
        "serve", help="serve the Ollama API over the ladder",
        description="Serve /api/tags, /api/ps, /api/show, /api/generate and /api/chat like Ollama. The memory "
                    "budget stands in for GPU memory: models beyond it are evicted least recently used first.")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, 0 = any)")
    serve.add_argument("--memory-budget", help="memory for loaded models, e.g. 1GiB (default: settings)")
    serve.add_argument("--cache-dir", type=Path, help="where the ladder is built (default: settings.cache_dir)")
    serve.add_argument("--model-dir", type=Path, action="append", default=[],
                       help="also serve every *.gguf in this directory (repeatable)")
    serve.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                       help=f"requests that may wait per model before 503 (default {DEFAULT_MAX_QUEUE})")
    serve.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                       help=f"llama.cpp threads per model (default {DEFAULT_THREADS})")
    serve.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_S,
                       help="on SIGTERM or Ctrl-C, how long requests in flight may finish before they are "
                            f"cut (default {DEFAULT_DRAIN_S:g})")
    serve.set_defaults(func=_serve)


def _prepare(args: argparse.Namespace, settings: Settings) -> int:
    cache_dir = args.cache_dir or settings.embedded.cache_dir
    entries = prepare_ladder(cache_dir, progress=not args.quiet, verify=args.verify)
    if not args.quiet:
        for entry in entries:
            print(f"{entry.tag:24} {entry.size / MIB:8.1f} MiB  {entry.path}")
    return EXIT_OK


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    try:
        budget = parse_bytes(args.memory_budget) if args.memory_budget else settings.embedded.memory_budget
    except ConfigError as error:
        print(f"quantrouter embedded serve: --memory-budget: {error}")
        return EXIT_USAGE
    config = EmbeddedConfig(
        cache_dir=args.cache_dir or settings.embedded.cache_dir,
        host=args.host,
        port=args.port,
        memory_budget_bytes=budget,
        model_dirs=tuple(args.model_dir),
        max_queue=args.max_queue,
        n_threads=args.threads,
        default_keep_alive=settings.backend.keep_alive,
        drain_seconds=args.drain_seconds,
    )
    asyncio.run(_serve_until_signalled(config))
    return EXIT_OK


async def _serve_until_signalled(config: EmbeddedConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with EmbeddedServer(config) as server:
        print(f"Ollama API at {server.url} (memory budget {config.memory_budget_bytes / MIB:.0f} MiB)",
              flush=True)
        await stop.wait()
