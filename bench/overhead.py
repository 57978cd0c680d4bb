"""Overhead benchmark: what the router adds between a client and Ollama, against the direct path in one run.

A client in this process streams completions straight from a backend with the official `ollama`
AsyncClient (what a service does without the router) and through a router with `AsyncRouterClient`,
in alternating rounds (direct, router, router, direct, ...) so both arms see the same machine. The
backend and the router each run in their own subprocess (`python -m quantrouter.cli serve`), so the
router's CPU time, utime + stime from /proc/<pid>/stat, is its own and not the client's.

Three backends: the canned Ollama fixture (bench.fixtures.canned_ollama) unpaced, so that the router
and not a model is what is measured, at 1, 16 and 256 concurrent streams; the same fixture paced at a
GPU-like decode rate, where the router is not saturated at low concurrency; then the embedded llama.cpp
backend for a realistic run at 1 and 4 streams.

Time to first token is from the call to the first text chunk. The added TTFT is distribution-wise,
p50(router) − p50(direct) and p99(router) − p99(direct): requests at 16 or 256 streams overlap and
have no natural partner in the other arm, and a latency objective is stated on the quantiles.

Run: `python -m bench.overhead [--quick]`. Writes bench/results/overhead.md and overhead.csv; the
reading between the markers at the top of the markdown is kept from one run to the next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import ollama

from bench.fixtures.canned_ollama import FAMILY as CANNED_FAMILY
from bench.fixtures.canned_ollama import VARIANTS as CANNED_VARIANTS
from bench.machine import describe
from quantrouter.client import AsyncRouterClient, Options

RESULTS = Path(__file__).parent / "results"
PROMPT = "Why is the sky blue?"
DIRECT, ROUTER = "direct", "router"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 600.0  # the embedded backend builds its model ladder on a fresh machine
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
REQUEST_TIMEOUT_S = 120.0
# The router's per-family default (64 streams) would shed the 256-stream rounds; raise it to what is measured.
ROUTER_ENV = {"QUANTROUTER_MAX_IN_FLIGHT": "256", "QUANTROUTER_MAX_IN_FLIGHT_PER_FAMILY": "256",
              "QUANTROUTER_MEMORY_RESERVE": "0", "QUANTROUTER_LOG_LEVEL": "info"}
CANNED, PACED, EMBEDDED = "canned", "canned-paced", "embedded"
CANNED_TOKENS, PACED_TOKENS, EMBEDDED_TOKENS = 128, 16, 32
# The paced fixture streams at a GPU-like decode rate, so the router is not saturated at low concurrency.
PACED_TOKENS_PER_S = 50.0
CANNED_CAPACITY = "80GiB"
EMBEDDED_BUDGET = "4GiB"
EMBEDDED_TAG = "gemma3:270m-q8_0"
READING_START, READING_END = "<!-- reading:start -->", "<!-- reading:end -->"


@dataclass(frozen=True, slots=True)
class Scenario:
    """One backend at one concurrency: `rounds` per arm, each `concurrency` streams × `per_stream` requests."""

    backend: str
    concurrency: int
    rounds: int
    per_stream: int
    num_predict: int
    router_model: str
    direct_tag: str


def scenarios(quick: bool) -> list[Scenario]:
    """Request counts are bounded so the whole run stays near five minutes on two cores."""
    canned_tag = next(v.tag for v in CANNED_VARIANTS if v.quantization_level == "Q4_K_M")
    canned = [(1, 8, 8), (16, 4, 4), (256, 3, 1)] if not quick else [(1, 2, 2), (16, 2, 1), (256, 2, 1)]
    paced = [(1, 6, 5), (16, 3, 3), (256, 2, 1)] if not quick else [(16, 2, 1)]
    embedded = [(1, 3, 2), (4, 2, 1)] if not quick else [(1, 2, 1)]
    return ([Scenario(CANNED, c, r, n, CANNED_TOKENS, CANNED_FAMILY, canned_tag) for c, r, n in canned]
            + [Scenario(PACED, c, r, n, PACED_TOKENS, CANNED_FAMILY, canned_tag) for c, r, n in paced]
            + [Scenario(EMBEDDED, c, r, n, EMBEDDED_TOKENS, EMBEDDED_TAG, EMBEDDED_TAG) for c, r, n in embedded])


@dataclass(frozen=True, slots=True)
class Sample:
    ttft_s: float
    tokens: int


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds so far of the router, the backend and this client process."""

    router: float
    backend: float
    client: float

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.router + other.router, self.backend + other.backend, self.client + other.client)

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.router - other.router, self.backend - other.backend, self.client - other.client)


@dataclass
class Arm:
    """Everything one arm of one scenario measured, summed over its rounds."""

    samples: list[Sample] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    cpu: Cpu = Cpu(0.0, 0.0, 0.0)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    def ttft_ms(self, quantile: float) -> float:
        ttfts = sorted(s.ttft_s for s in self.samples)
        if not ttfts:
            return float("nan")
        return 1000 * ttfts[min(len(ttfts) - 1, int(quantile * len(ttfts)))]

    def per_1k(self, seconds: float) -> float:
        return 1000 * seconds / self.tokens if self.tokens else float("nan")


# Subprocesses.

@dataclass(frozen=True, slots=True)
class Service:
    name: str
    pid: int
    address: str


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads (proc(5): fields 14 and 15, counted after the `comm` field)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mib(pid: int, field: str) -> float:
    """VmRSS (resident now) or VmHWM (its peak so far) of a process, from /proc/<pid>/status (proc(5))."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def spawned(name: str, argv: Sequence[str], env: Mapping[str, str], ready: str, logs: Path) -> Iterator[Service]:
    """Start `argv`, wait until its output matches `ready` (group 1 is its address), SIGTERM it on exit."""
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (match := re.search(ready, log.read_text(errors="replace"))) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start (exit {process.poll()}):\n{log.read_text()[-2000:]}")
            time.sleep(POLL_S)
        yield Service(name, process.pid, match.group(1))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


def canned_backend(name: str, tokens_per_second: float, logs: Path) -> contextlib.AbstractContextManager[Service]:
    return spawned(name, [sys.executable, "-m", "bench.fixtures.canned_ollama", "--port", "0",
                          "--tokens-per-second", str(tokens_per_second)], {}, r"(http://\S+)", logs)


def embedded_backend(logs: Path) -> contextlib.AbstractContextManager[Service]:
    return spawned(EMBEDDED, [sys.executable, "-m", "quantrouter.cli", "embedded", "serve", "--port", "0",
                                "--memory-budget", EMBEDDED_BUDGET], {}, r"Ollama API at (http://\S+)", logs)


def router_for(backend: Service, logs: Path, capacity: str) -> contextlib.AbstractContextManager[Service]:
    argv = [sys.executable, "-m", "quantrouter.cli", "serve", "--grpc-address", "127.0.0.1:0",
            "--metrics-address", "127.0.0.1:0", "--ollama-host", backend.address, "--memory-capacity", capacity]
    return spawned(f"router-{backend.name}", argv, ROUTER_ENV, r"quantrouter serving on port (\d+)", logs)


# The two arms.

async def direct_request(client: ollama.AsyncClient, scenario: Scenario) -> Sample:
    started = time.perf_counter()
    first, tokens = None, 0
    parts = await client.generate(model=scenario.direct_tag, prompt=PROMPT, stream=True,
                                  options={"num_predict": scenario.num_predict, "temperature": 0.0})
    async for part in parts:
        if part.response:
            first = first or time.perf_counter()
            tokens += 1
    return Sample((first or time.perf_counter()) - started, tokens)


async def router_request(client: AsyncRouterClient, scenario: Scenario) -> Sample:
    started = time.perf_counter()
    first, tokens = None, 0
    async for event in client.generate(scenario.router_model, PROMPT, timeout=REQUEST_TIMEOUT_S,
                                       options=Options(num_predict=scenario.num_predict, temperature=0.0)):
        if isinstance(event, str):
            first = first or time.perf_counter()
            tokens += 1
    return Sample((first or time.perf_counter()) - started, tokens)


async def run_round(request: Callable[[], Awaitable[Sample]], scenario: Scenario, arm: Arm,
                    cpu: Callable[[], Cpu]) -> None:
    async def stream() -> None:
        for _ in range(scenario.per_stream):
            try:
                arm.samples.append(await request())
            except Exception as error:  # a failed request is a result: counted by kind, not fatal
                arm.failures[type(error).__name__] += 1

    before, started = cpu(), time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(scenario.concurrency)))
    arm.wall_s += time.perf_counter() - started
    arm.cpu += cpu() - before


async def run_scenario(scenario: Scenario, backend: Service, router: Service) -> dict[str, Arm]:
    """Warm both arms once, then alternate rounds in ABBA order so drift cancels."""
    def cpu() -> Cpu:
        return Cpu(cpu_seconds(router.pid), cpu_seconds(backend.pid), client_cpu_seconds())

    # A service streaming this many requests at once would size its pool for them, as the router does.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (ollama.AsyncClient(host=backend.address, timeout=REQUEST_TIMEOUT_S, limits=limits) as direct,
                AsyncRouterClient(f"127.0.0.1:{router.address}") as routed):
        requests: dict[str, Callable[[], Awaitable[Sample]]] = {
            DIRECT: lambda: direct_request(direct, scenario),
            ROUTER: lambda: router_request(routed, scenario),
        }
        warmup = dataclasses.replace(scenario, per_stream=1)
        for name in (DIRECT, ROUTER):
            await run_round(requests[name], warmup, Arm(), cpu)
        arms = {DIRECT: Arm(), ROUTER: Arm()}
        for index in range(scenario.rounds):
            order = (DIRECT, ROUTER) if index % 2 == 0 else (ROUTER, DIRECT)
            for name in order:
                await run_round(requests[name], scenario, arms[name], cpu)
    return arms


# Results.

@dataclass(frozen=True, slots=True)
class Row:
    scenario: Scenario
    arm: str
    measured: Arm

    def values(self, baseline: Arm) -> dict[str, object]:
        m, is_router = self.measured, self.arm == ROUTER
        tps = m.tokens / m.wall_s if m.wall_s else float("nan")
        base_tps = baseline.tokens / baseline.wall_s if baseline.wall_s else float("nan")
        return {
            "backend": self.scenario.backend, "streams": self.scenario.concurrency, "arm": self.arm,
            "requests": len(m.samples), "failed": sum(m.failures.values()),
            "failures": " ".join(f"{k}×{v}" for k, v in m.failures.items()),
            "tokens": m.tokens, "wall_s": round(m.wall_s, 3),
            "ttft_p50_ms": round(m.ttft_ms(0.50), 2), "ttft_p99_ms": round(m.ttft_ms(0.99), 2),
            "tokens_per_s": round(tps, 1),
            "router_cpu_s_per_1k": round(m.per_1k(m.cpu.router), 4) if is_router else "",
            "backend_cpu_s_per_1k": round(m.per_1k(m.cpu.backend), 4),
            "client_cpu_s_per_1k": round(m.per_1k(m.cpu.client), 4),
            "added_ttft_p50_ms": round(m.ttft_ms(0.50) - baseline.ttft_ms(0.50), 2) if is_router else "",
            "added_ttft_p99_ms": round(m.ttft_ms(0.99) - baseline.ttft_ms(0.99), 2) if is_router else "",
            "throughput_vs_direct": round(tps / base_tps, 3) if is_router else "",
            "router_idle_cpu_s": round(baseline.cpu.router, 2) if is_router else "",
        }


def _table(rows: list[dict[str, object]], columns: Sequence[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[key]) for key, _ in columns) + " |" for row in rows]
    return lines


SUMMARY = (("backend", "backend"), ("streams", "streams"), ("added_ttft_p50_ms", "added TTFT p50 (ms)"),
           ("added_ttft_p99_ms", "added TTFT p99 (ms)"), ("tokens_per_s", "relay tok/s"),
           ("throughput_vs_direct", "tok/s vs direct"), ("router_cpu_s_per_1k", "router CPU s / 1k tok"),
           ("router_rss_idle_mib", "router RSS idle (MiB)"), ("router_rss_peak_mib", "router RSS peak (MiB)"),
           ("failed", "failed"))
DETAIL = (("backend", "backend"), ("streams", "streams"), ("arm", "arm"), ("requests", "requests"),
          ("tokens", "tokens"), ("wall_s", "wall s"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
          ("tokens_per_s", "tok/s"), ("router_cpu_s_per_1k", "router CPU s/1k"),
          ("backend_cpu_s_per_1k", "backend CPU s/1k"), ("client_cpu_s_per_1k", "client CPU s/1k"),
          ("router_idle_cpu_s", "router CPU s in direct rounds"), ("failures", "failures"))


def _kept_reading(path: Path) -> str:
    text = path.read_text() if path.exists() else ""
    start, end = text.find(READING_START), text.find(READING_END)
    if start < 0 or end < start:
        return f"{READING_START}\n(no reading yet)\n{READING_END}"
    return text[start:end + len(READING_END)]


def write_results(rows: list[dict[str, object]], started: datetime, elapsed_s: float) -> None:
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "overhead.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    markdown = RESULTS / "overhead.md"
    routed = [row for row in rows if row["arm"] == ROUTER]
    lines = [
        "# Router overhead: direct to the backend vs through quantrouter", "",
        _kept_reading(markdown), "",
        f"Run {started:%Y-%m-%d %H:%M} on {describe()}; {elapsed_s:.0f} s in all. "
        "Regenerate with `python -m bench.overhead` (bench/overhead.py explains the method).", "",
        "Client, router and backend are three processes sharing this machine's cores. TTFT is from the call "
        "to the first text chunk; the added TTFT is p50(router) − p50(direct) and p99(router) − p99(direct) "
        "over the same rounds (requests overlap, so they have no partner to pair with). Relay tok/s is text "
        "chunks (one token each) through one router process over the rounds' wall time. Router CPU is "
        "utime + stime of the router process during its rounds. The canned backend is the benchmark fixture "
        f"bench/fixtures/canned_ollama.py: `{CANNED}` unpaced with {CANNED_TOKENS} tokens a request, so the "
        f"router is saturated and measured; `{PACED}` at {PACED_TOKENS_PER_S:.0f} tokens/s per stream with "
        f"{PACED_TOKENS} tokens a request, a GPU-like decode rate. `{EMBEDDED}` is llama.cpp serving "
        f"`{EMBEDDED_TAG}` ({EMBEDDED_TOKENS} tokens a request) on the same cores.", "",
        "## Summary", "", *_table(routed, SUMMARY), "",
        "## Both arms", "", *_table(rows, DETAIL), "",
    ]
    markdown.write_text("\n".join(lines))


async def measure(scenario_list: list[Scenario], logs: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    backends: dict[str, tuple[Callable[[], contextlib.AbstractContextManager[Service]], str]] = {
        CANNED: (lambda: canned_backend(CANNED, 0.0, logs), CANNED_CAPACITY),
        PACED: (lambda: canned_backend(PACED, PACED_TOKENS_PER_S, logs), CANNED_CAPACITY),
        EMBEDDED: (lambda: embedded_backend(logs), EMBEDDED_BUDGET),
    }
    for backend_name, (backend_of, capacity) in backends.items():
        chosen = [s for s in scenario_list if s.backend == backend_name]
        if not chosen:
            continue
        with backend_of() as backend, router_for(backend, logs, capacity) as router:
            idle_mib = memory_mib(router.pid, "VmRSS")
            for scenario in chosen:
                print(f"{backend_name}: {scenario.concurrency} streams ...", file=sys.stderr, flush=True)
                arms = await run_scenario(scenario, backend, router)
                # Scenarios run in rising concurrency, so the peak so far is this one's.
                peak = {"router_rss_idle_mib": idle_mib, "router_rss_peak_mib": memory_mib(router.pid, "VmHWM")}
                rows += [{**Row(scenario, name, arms[name]).values(arms[DIRECT]),
                          **(peak if name == ROUTER else dict.fromkeys(peak, ""))} for name in (DIRECT, ROUTER)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Router overhead: direct vs routed streaming, in one run.")
    parser.add_argument("--quick", action="store_true", help="a few requests per scenario (a smoke run)")
    args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" else [])
    started, clock = datetime.now().astimezone(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="quantrouter-overhead-") as logs:
        rows = asyncio.run(measure(scenarios(args.quick), Path(logs)))
    write_results(rows, started, time.monotonic() - clock)
    print((RESULTS / "overhead.md").read_text())


if __name__ == "__main__":
    main()
