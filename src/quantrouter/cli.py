"""The `quantrouter` command: serve, talk to a running router, try it all on the embedded backend.

Settings come from flags, then `QUANTROUTER_*` variables, then `--config FILE` (TOML), then defaults
(quantrouter.config). Client commands (`generate`, `route`, `variants`) reach a router at `--target`
and load only the client; `serve` and `demo` import the server when they run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc

from quantrouter import __version__
from quantrouter.client import (
    DEFAULT_TARGET,
    AsyncRouterClient,
    Constraints,
    Options,
    PreferenceName,
    RouterClient,
    VariantListing,
)
from quantrouter.config import ConfigError, Settings, load_settings
from quantrouter.logs import configure_logging
from quantrouter.units import format_bytes
from quantrouter.values import Completion, Decision

__all__ = ["main"]

PREFERENCES: tuple[PreferenceName, ...] = ("quality", "balanced", "latency")
DEMO_PROMPT = "The capital of France is"
DEMO_FAMILY = "gemma3:270m"
DEMO_TOKENS = 96
# Ollama's own default (-1) generates until the model stops, which a base model may never do: a first
# `generate` on gemma3:270m ran 4,089 tokens for two minutes. A few paragraphs, unless asked for more.
DEFAULT_NUM_PREDICT = 256
# Commands that run a router: their parser leaves out the extras' commands (build_parser).
SERVING_COMMANDS = ("serve", "epp")


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (also QUANTROUTER_<NAME> variables or --config FILE)")
    group.add_argument("--config", type=Path, help="TOML file with settings (keys as in quantrouter.config)")
    group.add_argument("--grpc-address", dest="grpc_address", help="gRPC listen address (default 0.0.0.0:50051)")
    group.add_argument("--metrics-address", dest="metrics_address",
                       help="Prometheus /metrics listen address (default 0.0.0.0:9464)")
    group.add_argument("--workers", dest="workers", type=int,
                       help="router processes sharing the gRPC port, one core each (default 1); worker i serves "
                            "metrics on the metrics port + i")
    group.add_argument("--ollama-host", dest="ollama_host", help="Ollama URL (default $OLLAMA_HOST or 127.0.0.1:11434)")
    group.add_argument("--embedded", action="store_const", const=True, default=None,
                       help="start the embedded llama.cpp backend in-process and route to it (no Ollama, no GPU)")
    group.add_argument("--embedded-memory-budget", dest="embedded_memory_budget",
                       help="memory the embedded backend may use, standing in for VRAM (e.g. 1GiB)")
    group.add_argument("--memory-capacity", dest="memory_capacity",
                       help="GPU memory to assume when NVML is not available (e.g. 80GiB)")
    group.add_argument("--cache-dir", dest="cache_dir", help="where the embedded model ladder is cached")
    group.add_argument("--calibration", dest="calibration_file",
                       help="measured speeds from `quantrouter calibrate`, loaded at start")
    group.add_argument("--log-level", dest="log_level", choices=("debug", "info", "warning", "error"))
    group.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate chain for the gRPC port (TLS)")
    group.add_argument("--tls-key", dest="tls_key", help="PEM private key that goes with --tls-cert")
    group.add_argument("--tls-client-ca", dest="tls_client_ca",
                       help="PEM CA bundle; clients must present a certificate it signed (mutual TLS)")
    group.add_argument("--auth-token-file", dest="auth_token_file",
                       help="file of bearer tokens, one a line; calls but health need 'authorization: Bearer "
                            "<token>' (a single token may also come from $QUANTROUTER_AUTH_TOKEN)")


def _fleet_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fleet mode: route across many node routers, choosing node and variant")
    group.add_argument("--node", dest="nodes", action="append", metavar="NAME=ADDRESS",
                       help="fleet mode: route across the node router at ADDRESS (host:port) named NAME; "
                            "repeatable (also QUANTROUTER_NODES=a=host:port,b=host:port)")
    group.add_argument("--discover", metavar="k8s://NAMESPACE/SERVICE[:PORT]",
                       help="fleet mode: route across the ready endpoints of a headless Service, watched through "
                            "its EndpointSlices (needs the k8s extra)")
    group.add_argument("--node-stale-after", dest="node_stale_after",
                       help="fleet mode: leave a node out when its last report is older than this (default 5s)")
    group.add_argument("--node-tls-ca", dest="node_tls_ca",
                       help="fleet mode: reach the node routers over TLS, trusting this PEM CA bundle")
    group.add_argument("--node-tls-server-name", dest="node_tls_server_name",
                       help="fleet mode: the name the node routers' certificates carry (when nodes are dialled by "
                            "IP, as discovery does)")
    group.add_argument("--node-tls-cert", dest="node_tls_cert",
                       help="fleet mode: PEM certificate to present to node routers that require one (mutual TLS)")
    group.add_argument("--node-tls-key", dest="node_tls_key", help="PEM private key that goes with --node-tls-cert")


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("QUANTROUTER_TARGET", DEFAULT_TARGET),
                        help=f"router address (default $QUANTROUTER_TARGET or {DEFAULT_TARGET})")
    parser.add_argument("--token", default=os.environ.get("QUANTROUTER_TOKEN"),
                        help="bearer token, when the router requires one (default $QUANTROUTER_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _routing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a family (gemma3:270m) or an exact tag to pin (gemma3:270m-q8_0)")
    parser.add_argument("--preference", "-p", choices=PREFERENCES, default="balanced",
                        help="what to favour (default balanced)")
    parser.add_argument("--min-quantization", default="", help="quality floor, e.g. Q4_K_M")
    parser.add_argument("--allow", action="append", default=[], metavar="QUANT",
                        help="allowed quantization level (repeatable)")
    parser.add_argument("--min-tps", type=float, default=0.0, help="minimum decode tokens/sec")
    parser.add_argument("--max-ttft", type=float, help="maximum time to first token, seconds")
    parser.add_argument("--num-predict", type=int, default=DEFAULT_NUM_PREDICT,
                        help=f"most tokens to generate (default {DEFAULT_NUM_PREDICT}; -1: until the model stops)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, help="deadline in seconds")


def build_parser(extras: bool = True) -> argparse.ArgumentParser:
    """The whole CLI; without `extras`, no `embedded` or tool commands, whose imports (aiohttp, numpy, gguf,
    llama.cpp's helpers) would stay resident in every router process that never uses them."""
    parser = argparse.ArgumentParser(
        prog="quantrouter",
        description="A quantization-aware gRPC router in front of Ollama: for each request it picks the "
                    "quantization variant (q8_0, q5_K_M, q4_K_M, ...) that best serves the caller's preference "
                    "given the GPU memory free now, what is loaded, and the tokens/sec each variant delivered.",
        epilog="Try it with no GPU and no Ollama: `quantrouter demo`.")
    parser.add_argument("--version", action="version", version=f"quantrouter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve", help="run the router", description="Run the gRPC router (and its /metrics port) until SIGTERM. "
        "With --node or --discover it is a fleet router: it follows each node router's capacity reports and "
        "forwards every request to the node and variant it chooses.")
    _settings_flags(serve_parser)
    _fleet_flags(serve_parser)
    serve_parser.set_defaults(func=_serve)

    epp = commands.add_parser(
        "epp", help="run the Endpoint Picker for Envoy / the Gateway API Inference Extension",
        description="Serve Envoy's ext_proc (envoy.service.ext_proc.v3) on the gRPC address: for each HTTP request "
        "to /api/generate, /api/chat, /v1/chat/completions or /v1/completions, pick the node and the quantization "
        "variant from the node routers' capacity reports, rewrite the body's model to that variant and tell Envoy "
        "where to send it (x-gateway-destination-endpoint). The caller's preference comes from the "
        "x-quantrouter-preference header or a +quality / +balanced / +latency suffix on the model. "
        "Needs the gateway extra.")
    _settings_flags(epp)
    _fleet_flags(epp)
    group = epp.add_argument_group("endpoint picker")
    group.add_argument("--endpoint", dest="endpoints", action="append", metavar="NAME=HOST:PORT",
                       help="the model server (Ollama) of node NAME, where Envoy sends its requests; repeatable "
                            "(default: the node router's host at --endpoint-port)")
    group.add_argument("--endpoint-port", dest="endpoint_port", type=int,
                       help="the model servers' port beside each node router (default 11434, Ollama's)")
    group.add_argument("--fallbacks", type=int,
                       help="nodes after the picked one the proxy may try, in order (default 0: Envoy's ORIGINAL_DST "
                            "cluster takes one address; its override_host policy and GIE gateways take a list)")
    group.add_argument("--max-in-flight", dest="max_in_flight", type=int,
                       help="streams in flight through the picker before it sheds with 429 (default 256)")
    epp.set_defaults(func=_epp)

    demo = commands.add_parser("demo", help="start everything on the embedded backend and show routing at work",
                               description="Builds the model ladder if needed, starts the embedded llama.cpp "
                                           "backend and the router, sends requests with each preference and "
                                           "prints the decisions and measured tokens/sec.")
    _settings_flags(demo)
    demo.add_argument("--rounds", type=int, default=2, help="requests per preference (default 2)")
    demo.add_argument("--keep-serving", action="store_true", help="keep the router running afterwards")
    demo.set_defaults(func=_demo)

    generate = commands.add_parser("generate", help="send a prompt to a running router and stream the answer",
                                   description="Prints the routing decision, then streams the generated text, "
                                               "then the measured figures.")
    _routing_flags(generate)
    generate.add_argument("prompt", help="the prompt")
    _client_flags(generate)
    generate.set_defaults(func=_generate)

    route = commands.add_parser("route", help="ask a running router what it would pick, and why (dry run)")
    _routing_flags(route)
    route.add_argument("--prompt", default="", help="prompt whose length prices prompt processing")
    _client_flags(route)
    route.set_defaults(func=_route)

    variants = commands.add_parser(
        "variants", help="list families and variants a running router (or a backend) knows",
        description="Per family: tag, quant level, size, parameter count, resident or not, VRAM, tokens/sec "
                    "(measured, or * a prior) with its sample count, and quality: measured by `calibrate --quality` "
                    "(marked measured) or its quant type's quality prior (marked prior). From a running "
                    "router at --target, or straight from a backend with --backend URL (speeds are then the "
                    "router's priors, or the figures of --calibration FILE).")
    variants.add_argument("family", nargs="?", default="", help="only this family")
    variants.add_argument("--backend", metavar="URL", help="read Ollama or `quantrouter embedded serve` at URL, "
                                                           "no router needed")
    variants.add_argument("--calibration", dest="calibration_file", help="with --backend: a calibration file")
    _client_flags(variants)
    variants.set_defaults(func=_variants)

    if not extras:
        return parser
    try:
        from quantrouter.embedded.cli import add_embedded_commands
    except ImportError as error:  # the production image has no llama.cpp: say how to get it
        reason = str(error)
        missing = commands.add_parser("embedded", help="the built-in llama.cpp backend (needs the embedded extra)")
        missing.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        missing.set_defaults(func=lambda args, settings: _needs_extra("embedded", reason))
    else:
        add_embedded_commands(commands)
    from quantrouter.tools.cli import add_tool_commands
    add_tool_commands(commands)
    return parser


def _load(args: argparse.Namespace) -> Settings:
    flags = {k: v for k, v in vars(args).items() if v is not None}
    return load_settings(flags, os.environ, args.config if getattr(args, "config", None) else None)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from quantrouter.server import serve_processes  # only serving loads the server (grpc.aio, prometheus, ollama)

    if settings.fleet.nodes or settings.fleet.discover:
        from quantrouter.fleet.server import start_fleet
        return serve_processes(settings, start_fleet)
    return serve_processes(settings)


def _epp(args: argparse.Namespace, settings: Settings) -> int:
    if not (settings.fleet.nodes or settings.fleet.discover):
        raise ConfigError("the picker routes across node routers: give --node NAME=HOST:PORT or --discover")
    try:
        from quantrouter.gateway.server import start_epp
    except ImportError as error:
        return _needs_extra("gateway", f"{error.name} is missing")
    from quantrouter.server import serve_processes

    return serve_processes(settings, start_epp)


def _constraints(args: argparse.Namespace) -> Constraints:
    return Constraints(args.min_quantization, tuple(args.allow), args.min_tps, args.max_ttft)


def _options(args: argparse.Namespace) -> Options:
    return Options(num_predict=args.num_predict, temperature=args.temperature, seed=args.seed)


def _decision_lines(decision: Decision) -> list[str]:
    where = f" on node {decision.node}" if decision.node else ""
    lines = [f"→ {decision.chosen.tag if decision.chosen else 'nothing'}{where}: {decision.reason}"]
    for c in sorted(decision.candidates, key=lambda c: (c.node, -c.quality, c.tag)):
        mark = "✓" if c.feasible else "✗"
        node = f"{c.node:<10} " if c.node else ""
        lines.append(f"  {mark} {node}{c.tag:<28} {c.quantization:<7} {format_bytes(c.memory_bytes):>10} "
                     f"{c.tokens_per_second:7.1f} tok/s{'' if c.measured else '*'} q={c.quality:.3f} "
                     f"{'measured' if c.quality_measured else 'prior':<8} "
                     f"T={c.expected_seconds:6.2f}s queue={c.queue_seconds:.2f}s churn={c.churn_seconds:.2f}s"
                     f"{' at-risk' if c.at_risk else ''}{f' endangers={c.endangers}' if c.endangers else ''}"
                     f"{f' held back: {c.held_back}' if c.held_back else ''} {c.rejection}")
    return lines


def _completion_line(c: Completion) -> str:
    return (f"[{c.variant}: {c.generated_tokens} tokens at {c.tokens_per_second:.1f} tok/s, first token after "
            f"{c.time_to_first_token * 1000:.0f} ms, load {c.load_seconds * 1000:.0f} ms, {c.done_reason}]")


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    with RouterClient(args.target, token=args.token) as client:
        for event in client.generate(args.model, args.prompt, preference=args.preference, options=_options(args),
                                     constraints=_constraints(args), timeout=args.timeout):
            if isinstance(event, Decision):
                print("\n".join(_decision_lines(event)), file=sys.stderr)
            elif isinstance(event, Completion):
                print(file=sys.stdout)
                print(json.dumps(asdict(event)) if args.json else _completion_line(event), file=sys.stderr)
            else:
                print(event, end="", flush=True)
    return 0


def _route(args: argparse.Namespace, settings: Settings) -> int:
    with RouterClient(args.target, token=args.token) as client:
        decision = client.route(args.model, prompt=args.prompt, preference=args.preference, options=_options(args),
                                constraints=_constraints(args), timeout=args.timeout)
    print(json.dumps(asdict(decision), default=str, indent=2) if args.json else "\n".join(_decision_lines(decision)))
    return 0


def format_listing(listing: VariantListing) -> str:
    devices = ", ".join(listing.gpus)
    lines = [f"memory ({listing.memory_source}{': ' + devices if devices else ''}): "
             f"{format_bytes(listing.free_bytes)} free of {format_bytes(listing.total_bytes)}"
             + (f" — {listing.memory_detail}" if listing.memory_detail else "")]
    header = f"  {'tag':<30} {'quant':<7} {'size':>10} {'params':>8} {'resident':>8} {'vram':>10} " \
             f"{'tok/s':>8} {'n':>4} {'quality':>7} {'':<8}"
    for family, variants in listing.families.items():
        lines += [family, header]
        for v in variants:
            tps = f"{v.tokens_per_second:.1f}" + ("" if v.measured else "*")
            lines.append(f"  {v.tag:<30} {v.quantization:<7} {format_bytes(v.size_bytes):>10} "
                         f"{v.parameter_count / 1e6:>7.0f}M {'yes' if v.resident else 'no':>8} "
                         f"{format_bytes(v.vram_bytes):>10} {tps:>8} {v.samples:>4} {v.quality:>7.3f} "
                         f"{'measured' if v.quality_measured else 'prior':<8}")
    lines.append("* prior estimate: no request measured yet; quality: measured (calibrate --quality) or the "
                 "quant type's prior")
    return "\n".join(lines)


def _variants(args: argparse.Namespace, settings: Settings) -> int:
    if args.backend:
        from quantrouter.tools.live import backend_listing, read_backend
        listing = backend_listing(asyncio.run(read_backend(settings, args.backend)), settings.policy, args.family)
    else:
        with RouterClient(args.target, token=args.token) as client:
            listing = client.list_variants(args.family)
    print(json.dumps(asdict(listing), indent=2) if args.json else format_listing(listing))
    return 0


async def _demo_request(client: AsyncRouterClient, preference: PreferenceName) -> tuple[Decision, Completion, str]:
    decision, completion, text = None, None, []
    async for event in client.generate(DEMO_FAMILY, DEMO_PROMPT, preference=preference,
                                       options=Options(num_predict=DEMO_TOKENS, temperature=0.0)):
        if isinstance(event, Decision):
            decision = event
        elif isinstance(event, Completion):
            completion = event
        else:
            text.append(event)
    if decision is None or completion is None:
        raise RuntimeError("the stream ended without a decision and a completion")
    return decision, completion, "".join(text)


async def _demo_async(args: argparse.Namespace, settings: Settings) -> int:
    from quantrouter.server import describe, start

    running = await start(settings)
    try:
        print(f"quantrouter demo: {describe(running)}\n")
        print(f"{'round':>5} {'preference':<10} {'variant':<22} {'quant':<7} {'tok/s':>7} {'ttft':>7}  answer")
        async with AsyncRouterClient(f"127.0.0.1:{running.port}") as client:
            for round_number in range(1, args.rounds + 1):
                for preference in PREFERENCES:
                    decision, completion, text = await _demo_request(client, preference)
                    answer = " ".join(text.split())[:48]
                    print(f"{round_number:>5} {preference:<10} {completion.variant:<22} "
                          f"{decision.chosen.quantization if decision.chosen else '':<7} "
                          f"{completion.tokens_per_second:>7.1f} {completion.time_to_first_token * 1000:>5.0f}ms  "
                          f"{answer}", flush=True)
        print(f"\nwhy the last {preference} request went where it did:")
        print("\n".join(_decision_lines(decision)))
        print(f"\nmetrics: curl -s http://127.0.0.1:{running.metrics_port}/metrics | grep quantrouter_")
        if args.keep_serving:
            print(f"serving on {settings.server.grpc_address} (port {running.port}); Ctrl-C to stop")
            await running.wait()
        return 0
    finally:
        await running.stop(grace=1.0)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    server = settings.server
    if not args.keep_serving:  # a one-shot demo takes free ports, so it runs beside anything
        server = replace(server, grpc_address=args.grpc_address or "127.0.0.1:0",
                         metrics_address=args.metrics_address or "127.0.0.1:0")
    demo = replace(settings, server=server, embedded=replace(settings.embedded, enabled=True))
    return asyncio.run(_demo_async(args, demo))


def _needs_extra(extra: str, reason: str) -> int:
    print(f"quantrouter: this needs the {extra} extra: pip install 'quantrouter[{extra}]' ({reason})",
          file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(extras=not arguments or arguments[0] not in SERVING_COMMANDS)
    args = parser.parse_args(arguments)
    try:
        settings = _load(args)
    except ConfigError as error:
        parser.error(str(error))
    configure_logging(settings.server.log_level)
    try:
        result: Any = args.func(args, settings)
        return int(result)
    except grpc.RpcError as error:
        print(f"quantrouter: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except ConfigError as error:
        print(f"quantrouter: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
