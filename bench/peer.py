"""Peer benchmark: LiteLLM's proxy beside quantrouter, both in front of the same canned backend, in one run.

Three arms per scenario, each streaming the same completions: *direct* (the canned Ollama fixture's
`/api/generate` NDJSON, parsed as bench/overhead.py's direct client does), *router* (quantrouter's gRPC
`Generate`, which reaches the backend over `/api/generate`) and *litellm* (LiteLLM's proxy, one process,
streaming its OpenAI-compatible `/v1/chat/completions` as server-sent events, configured with an
`ollama/<tag>` model so that it too reaches the backend over `/api/generate`). One backend protocol for
all three: what differs between the arms is the proxy alone. The machinery is bench/overhead.py's
(subprocesses, rounds, figures, spread): a repetition runs one round an arm and then one more in reverse
order (direct, router, litellm, litellm, router, direct), each arm gets ≥ 200 requests a repetition, and
every figure is computed per repetition (the proxy's quantile minus direct's) and summarised as the
median over repetitions with the min–max range.

LiteLLM is the optional `peer` extra, best in its own virtualenv: its proxy pins uvloop < 0.22, which
would otherwise replace the router's own event loop library in the measuring environment (README,
Benchmarks). Run: `python -m bench.peer [--litellm PATH] [--quick]`. Writes
bench/results/peer.md and peer.csv; the reading is built from the run's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import aiohttp

from bench.machine import describe, free_port, memory_mib
from bench.overhead import (
    CANNED,
    CANNED_TAG,
    DETAIL,
    DIRECT,
    PACED,
    PACED_TOKENS_PER_S,
    PROMPT,
    RELAY_MANY,
    REQUEST_TIMEOUT_S,
    ROUTER,
    TTFT_MANY,
    TTFT_ONE,
    Arm,
    Sample,
    Scenario,
    _table,
    arms_for,
    canned_backend,
    figures,
    router_for,
    run_round,
    spread,
)
from bench.processes import Service, spawned

RESULTS = Path(__file__).parent / "results"
LITELLM = "litellm"
ARMS = (DIRECT, ROUTER, LITELLM)
PROXIES = (ROUTER, LITELLM)
TITLES = {ROUTER: "quantrouter", LITELLM: "LiteLLM"}
SCENARIOS = (TTFT_ONE, TTFT_MANY, RELAY_MANY)
REPETITIONS = 3
# The name LiteLLM's clients ask for; its config maps it to the canned tag over Ollama's /api/generate.
LITELLM_MODEL = "canned"
# No network at start (its cost map ships with the package), no per-request logging on the hot path.
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION"}
LITELLM_READY = r"Uvicorn running on (http://\S+)"
# Uvicorn, which serves LiteLLM's proxy, closes a connection idle for 5 s (its --timeout-keep-alive default);
# between an arm's rounds the client's pooled connections idle longer, and one reused as the server closes it
# fails (ServerDisconnectedError). The client lets go first.
CLIENT_KEEPALIVE_S = 2.0
# Where the README installs the `peer` extra: a virtualenv of its own beside the project's.
PEER_VENV_LITELLM = Path(__file__).parent.parent / ".venv-peer" / "bin" / LITELLM
INSTALL_HINT = ("Install the `peer` extra in its own virtualenv: python3 -m venv .venv-peer && "
                ".venv-peer/bin/pip install -e '.[peer]' (README, Benchmarks), or pass --litellm PATH.")
SSE_DATA = b"data: "
SSE_DONE = b"[DONE]"


def litellm_version(executable: str) -> str:
    """The version installed beside the `litellm` executable (its own interpreter reads the metadata)."""
    python = Path(executable).resolve().parent / "python"
    result = subprocess.run([str(python if python.exists() else sys.executable), "-c",
                             "import importlib.metadata as m; print(m.version('litellm'))"],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


def litellm_for(backend: Service, executable: str, logs: Path) -> contextlib.AbstractContextManager[Service]:
    """LiteLLM's proxy (one uvicorn process) with one model: the canned tag through `ollama/`."""
    config = logs / f"litellm-{backend.name}.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {LITELLM_MODEL}\n"
        "    litellm_params:\n"
        f"      model: ollama/{CANNED_TAG}\n"
        f"      api_base: {backend.address}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n")
    argv = [executable, "--config", str(config), "--host", "127.0.0.1", "--port", str(free_port()),
            "--num_workers", "1"]
    return spawned(f"litellm-{backend.name}", argv, LITELLM_ENV, LITELLM_READY, logs)


async def litellm_request(session: aiohttp.ClientSession, scenario: Scenario) -> Sample:
    """An OpenAI-style streamed chat completion: the first content delta is the first token; the usage LiteLLM
    reports (Ollama's eval_count) the tokens."""
    started = time.perf_counter()
    first, tokens, pending = None, 0, b""
    body = {"model": LITELLM_MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": scenario.num_predict, "temperature": 0.0, "stream_options": {"include_usage": True}}
    async with session.post("/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for data in response.content.iter_any():
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if not line.startswith(SSE_DATA) or line[len(SSE_DATA):] == SSE_DONE:
                    continue
                chunk = json.loads(line[len(SSE_DATA):])
                if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", ())):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = int(chunk["usage"].get("completion_tokens") or 0)
    return Sample((first or time.perf_counter()) - started, tokens)


@contextlib.asynccontextmanager
async def peer_arms(backend: Service, router: Service, litellm: Service, scenario: Scenario
                    ) -> AsyncIterator[dict[str, Callable[[], Awaitable[Sample]]]]:
    async with (arms_for(backend, router, scenario) as requests,
                aiohttp.ClientSession(litellm.address, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                                      connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=CLIENT_KEEPALIVE_S)
                                      ) as session):
        yield {**requests, LITELLM: lambda: litellm_request(session, scenario)}


async def run_scenario(scenario: Scenario, backend: Service, proxies: Mapping[str, Service], repetitions: int
                       ) -> list[dict[str, Arm]]:
    """Warm each arm once, then per repetition one round an arm and one more in reverse order. A proxy arm's
    CPU is its own process's; the direct arm's is the router's while it idles (as bench/overhead.py counts)."""
    pids = {DIRECT: proxies[ROUTER].pid, **{name: service.pid for name, service in proxies.items()}}
    results = []
    async with peer_arms(backend, proxies[ROUTER], proxies[LITELLM], scenario) as requests:
        warmup = replace(scenario, per_stream=1)
        for name in ARMS:
            await run_round(requests[name], warmup, Arm(), pids[name])
        for _ in range(repetitions):
            arms = {name: Arm() for name in ARMS}
            for name in [*ARMS, *reversed(ARMS)]:
                await run_round(requests[name], scenario, arms[name], pids[name])
            results.append(arms)
    return results


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a run leaves besides its rows: each proxy's resident memory (MiB) when idle and at its peak, and
    each arm's failed requests by kind."""

    idle: dict[str, float]
    peak: dict[str, float]
    failures: dict[str, Counter[str]]


async def measure(chosen: Sequence[Scenario], repetitions: int, executable: str, logs: Path
                  ) -> tuple[list[dict[str, object]], Outcome]:
    rows: list[dict[str, object]] = []
    idle: dict[str, list[float]] = {name: [] for name in PROXIES}
    peak: dict[str, list[float]] = {name: [] for name in PROXIES}
    failures: dict[str, Counter[str]] = {name: Counter() for name in ARMS}
    for backend_name in (PACED, CANNED):
        mine = [s for s in chosen if s.backend == backend_name]
        if not mine:
            continue
        with (canned_backend(backend_name, logs) as backend, router_for(backend, logs) as router,
              litellm_for(backend, executable, logs) as litellm):
            proxies = {ROUTER: router, LITELLM: litellm}
            for name, service in proxies.items():
                idle[name].append(memory_mib(service.pid, "VmRSS"))
            for scenario in mine:
                print(f"{scenario.name} ...", file=sys.stderr, flush=True)
                for index, arms in enumerate(await run_scenario(scenario, backend, proxies, repetitions)):
                    rows += figures(scenario, index, arms)
                    for name, arm in arms.items():
                        failures[name] += arm.failures
            for name, service in proxies.items():
                peak[name].append(memory_mib(service.pid, "VmHWM"))
    return rows, Outcome({n: max(v) for n, v in idle.items()}, {n: max(v) for n, v in peak.items()}, failures)


def _ratio(rows: Sequence[Mapping[str, object]], scenario: Scenario, key: str, over: str, under: str) -> str:
    """One arm's median over another's, for one figure."""
    top, bottom = spread(rows, scenario, over, key).median, spread(rows, scenario, under, key).median
    return f"{top / bottom:.1f}×" if bottom > 0 else "—"


def _failed(failures: Counter[str]) -> str:
    total = sum(failures.values())
    return f"{total} ({', '.join(f'{n} {kind}' for kind, n in failures.most_common())})" if total else "0"


def reading(rows: Sequence[Mapping[str, object]], outcome: Outcome, scenarios: Sequence[Scenario]) -> str:
    """The prose, every figure from `rows` and `outcome`."""
    def of(scenario: Scenario, arm: str, key: str, digits: int) -> str:
        return spread(rows, scenario, arm, key).text(digits)

    parts = []
    if TTFT_ONE in scenarios:
        parts.append(
            f"With one stream at a GPU-like {PACED_TOKENS_PER_S:.0f} tok/s, quantrouter adds "
            f"{of(TTFT_ONE, ROUTER, 'added_ttft_p50_ms', 2)} ms to time to first token at p50 and LiteLLM "
            f"{of(TTFT_ONE, LITELLM, 'added_ttft_p50_ms', 2)} ms "
            f"({_ratio(rows, TTFT_ONE, 'added_ttft_p50_ms', LITELLM, ROUTER)} of quantrouter's)")
    if TTFT_MANY in scenarios:
        parts.append(
            f"with {TTFT_MANY.streams} paced streams the added p99 is {of(TTFT_MANY, ROUTER, 'added_ttft_p99_ms', 2)} "
            f"ms through quantrouter and {of(TTFT_MANY, LITELLM, 'added_ttft_p99_ms', 2)} ms through LiteLLM "
            f"({_ratio(rows, TTFT_MANY, 'added_ttft_p99_ms', LITELLM, ROUTER)})")
    if RELAY_MANY in scenarios:
        parts.append(
            f"unpaced over {RELAY_MANY.streams} streams one quantrouter process relays "
            f"{of(RELAY_MANY, ROUTER, 'tokens_per_s', 0)} tok/s ({of(RELAY_MANY, ROUTER, 'relay_vs_direct', 3)}× of "
            f"direct) at {of(RELAY_MANY, ROUTER, 'router_cpu_s_per_1k', 3)} CPU-seconds per 1,000 tokens, one LiteLLM "
            f"process {of(RELAY_MANY, LITELLM, 'tokens_per_s', 0)} tok/s "
            f"({of(RELAY_MANY, LITELLM, 'relay_vs_direct', 3)}×) at "
            f"{of(RELAY_MANY, LITELLM, 'router_cpu_s_per_1k', 3)}: quantrouter relays "
            f"{_ratio(rows, RELAY_MANY, 'tokens_per_s', ROUTER, LITELLM)} LiteLLM's rate")
    return ("; ".join(parts) + ". "
            f"Idle, quantrouter holds {outcome.idle[ROUTER]:.1f} MiB resident and LiteLLM "
            f"{outcome.idle[LITELLM]:.1f} MiB (peaks {outcome.peak[ROUTER]:.1f} and "
            f"{outcome.peak[LITELLM]:.1f} MiB). Failed requests: "
            f"{'; '.join(f'{arm} {_failed(outcome.failures[arm])}' for arm in ARMS)}. Medians over repetitions with "
            "[min – max]; clients, proxies and backend share the machine's cores, so compare the arms within this "
            "run, not runs with each other.")


SUMMARY = (("added_ttft_p50_ms", "added TTFT p50 ms", 2), ("added_ttft_p99_ms", "added TTFT p99 ms", 2),
           ("tokens_per_s", "tok/s", 0), ("relay_vs_direct", "tok/s vs direct", 3),
           ("router_cpu_s_per_1k", "proxy CPU s / 1k tok", 3))


def write_results(rows: list[dict[str, object]], outcome: Outcome, scenarios: Sequence[Scenario], version: str,
                  started: datetime, elapsed_s: float, repetitions: int, load_before: tuple[float, float, float]
                  ) -> str:
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "peer.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=DETAIL)
        writer.writeheader()
        writer.writerows(rows)
    text = reading(rows, outcome, scenarios)
    summary = [[s.name, TITLES[arm], *(spread(rows, s, arm, key).text(digits) for key, _, digits in SUMMARY)]
               for s in scenarios for arm in PROXIES]
    lines = [
        "# A peer: quantrouter and LiteLLM's proxy in front of the same backend", "",
        f"Run {started:%Y-%m-%d %H:%M %Z} on {describe()}, LiteLLM {version}; {elapsed_s:.0f} s in all; load average "
        f"before the run {', '.join(f'{x:.2f}' for x in load_before)}. Regenerate with `python -m bench.peer "
        "[--litellm PATH]` (bench/peer.py explains the method).", "",
        f"**Reading (generated from this run's figures).** {text}", "",
        "## Summary", "",
        f"Median over {repetitions} repetitions [min – max]. Each arm gets ≥ 200 requests a repetition, the arms in "
        "the order direct, quantrouter, LiteLLM and back. All three reach the canned backend "
        "(bench/fixtures/canned_ollama.py) over Ollama's `/api/generate`: direct as NDJSON, quantrouter through "
        "its gRPC `Generate`, LiteLLM through its OpenAI-compatible `/v1/chat/completions` (server-sent events) "
        "with an `ollama/` model. TTFT is from the call to the first text; added TTFT is the proxy's quantile "
        "minus direct's in the same repetition. Tok/s counts the tokens the backend reported over the rounds' "
        "wall time. Proxy CPU is utime + stime of the proxy's process (the csv's `router_cpu_s_per_1k`, named as "
        "in bench/overhead.py: LiteLLM's process on its rows, the idle router's on direct's). "
        f"`{PACED}`: the fixture at {PACED_TOKENS_PER_S:.0f} tok/s a stream; `{CANNED}`: as fast as it can write.", "",
        *_table(("scenario", "proxy", *(title for _, title, _ in SUMMARY)), summary), "",
        "## Every repetition", "", *_table(DETAIL, [[row[key] for key in DETAIL] for row in rows]), "",
    ]
    (RESULTS / "peer.md").write_text("\n".join(lines))
    return text


def _litellm_executable(given: str | None) -> str | None:
    """`--litellm`, else the README's `.venv-peer`, else beside this Python, else on PATH; None when absent."""
    if given is not None:
        if not (Path(given).is_file() and os.access(given, os.X_OK)):
            raise SystemExit(f"--litellm {given}: not an executable file")
        return given
    return next((str(path) for path in (PEER_VENV_LITELLM, Path(sys.executable).parent / LITELLM)
                 if path.is_file() and os.access(path, os.X_OK)), None) or shutil.which(LITELLM)


def main() -> None:
    parser = argparse.ArgumentParser(description="quantrouter and LiteLLM's proxy vs direct, in one run.")
    parser.add_argument("--litellm", metavar="PATH",
                        help="the `litellm` executable (default: .venv-peer/bin/litellm, else beside this Python, "
                             "else on PATH)")
    parser.add_argument("--quick", action="store_true", help="one repetition, a tenth of the requests (a smoke run)")
    args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" else [])
    executable = _litellm_executable(args.litellm)
    if executable is None:  # `make bench` runs every benchmark: without the optional peer, skip this one
        print(f"bench.peer skipped: no `litellm` found. {INSTALL_HINT}", file=sys.stderr)
        return
    started, clock, load_before = datetime.now().astimezone(), time.monotonic(), os.getloadavg()
    chosen = [replace(s, per_stream=max(1, s.per_stream // 10)) for s in SCENARIOS] if args.quick else SCENARIOS
    repetitions = 1 if args.quick else REPETITIONS
    with tempfile.TemporaryDirectory(prefix="quantrouter-peer-") as logs:
        rows, outcome = asyncio.run(measure(chosen, repetitions, executable, Path(logs)))
    write_results(rows, outcome, SCENARIOS, litellm_version(executable), started, time.monotonic() - clock,
                  repetitions, load_before)
    print((RESULTS / "peer.md").read_text())


if __name__ == "__main__":
    main()
