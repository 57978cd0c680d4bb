"""Load: hundreds of concurrent Generate streams through the router to the embedded llama.cpp backend,
and a burst of 1,000 at once to the canned Ollama fixture.

Run: `python -m bench load` (or `python -m bench.load`; `python -m bench.load --burst` runs the burst alone).
The router runs as its own process (`quantrouter serve`), so its CPU time, memory and sockets are read from
/proc/<pid> alone.

The burst (bench/results/load-1000.md) starts 1,000 streams at once, with no retries, against a router
capped at 512 in flight in front of the canned fixture at 4 tok/s a stream: each must complete or be
refused with RESOURCE_EXHAUSTED and RetryInfo, and afterwards the router's resident memory and open
sockets must come back to where they were before it (sockets once the backend pool's idle connections
expire). The router runs under bench.memory_probe, which tells who holds its memory at each reading.
The embedded run (bench/results/load.md): each client retries RESOURCE_EXHAUSTED (the router's in-flight
caps, or the backend's full queue) after the RetryInfo delay; the backend and the clients share this process.
Pass: zero other errors and every stream complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc

from bench.fixtures.canned_ollama import FAMILY as CANNED_FAMILY
from bench.machine import cpu_seconds, describe
from bench.memory_probe import PROBE_FILE_VARIABLE, MemoryFigures, read_figures
from bench.processes import ROUTER_READY, SERVE_ARGUMENTS, canned_ollama, node_router, router_env, spawned
from bench.stats import percentile
from quantrouter.backend import STREAM_KEEPALIVE_S
from quantrouter.client import error_details
from quantrouter.config import default_cache_dir
from quantrouter.embedded import EmbeddedConfig, prepare_ladder, run_embedded_in_thread
from quantrouter.units import GiB
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc

RESULTS = Path(__file__).parent / "results" / "load.md"
FAMILY = "gemma3:270m"
STREAMS = 300
NUM_PREDICT = 8
# Each stream gives up after this many refusals: bounded, and far above what a healthy run needs.
MAX_ATTEMPTS = 400
# Back-off when a refusal carries no RetryInfo (every RESOURCE_EXHAUSTED of ours does).
DEFAULT_RETRY_S = 0.5
STREAM_DEADLINE_S = 120.0
BACKEND_QUEUE = 8  # the embedded backend's per-model queue (Ollama's OLLAMA_MAX_QUEUE, scaled down)
ROUTER_CAPS = {"QUANTROUTER_MAX_IN_FLIGHT": "128", "QUANTROUTER_MAX_IN_FLIGHT_PER_FAMILY": "64"}
PREFERENCES = (pb.PREFERENCE_LATENCY, pb.PREFERENCE_BALANCED, pb.PREFERENCE_QUALITY)
PROMPTS = ("The capital of France is", "Water boils at", "The largest planet is", "Bread is made from")
# The router's line after it gave freed memory back (quantrouter.allocator).
_TRIMMED = re.compile(
    r"returned freed memory: resident ([\d.]+) → ([\d.]+) MiB(?: \(malloc has ([\d.]+) MiB in use\))?")


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    variants: Counter[str] = field(default_factory=Counter)
    fallbacks: int = 0


async def one_stream(stub: pb_grpc.RouterServiceStub, index: int, tally: Tally) -> None:
    request = pb.GenerateRequest(model=FAMILY, prompt=PROMPTS[index % len(PROMPTS)],
                                 preference=PREFERENCES[index % len(PREFERENCES)],
                                 options=pb.GenerationOptions(num_predict=NUM_PREDICT, temperature=0.0, seed=index))
    started = time.perf_counter()
    for _ in range(MAX_ATTEMPTS):
        first_token = None
        try:
            async for response in stub.Generate(request, timeout=STREAM_DEADLINE_S):
                if response.HasField("decision") and response.decision.fallback:
                    tally.fallbacks += 1
                elif response.HasField("chunk") and first_token is None:
                    first_token = time.perf_counter() - started
                elif response.HasField("completion"):
                    tally.latencies.append(time.perf_counter() - started)
                    tally.first_tokens.append(first_token or tally.latencies[-1])
                    tally.variants[response.completion.variant] += 1
                    return
            tally.errors["stream ended without a completion"] += 1
            return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                tally.errors[f"{error.code().name}: {error.details()}"] += 1
                return
            details = error_details(error)
            tally.refusals[details.reason] += 1
            await asyncio.sleep(details.retry_after if details.retry_after is not None else DEFAULT_RETRY_S)
    tally.errors["gave up after too many refusals"] += 1


async def run_load(target: str) -> tuple[Tally, float]:
    tally = Tally()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        started = time.perf_counter()
        await asyncio.gather(*(one_stream(stub, i, tally) for i in range(STREAMS)))
        return tally, time.perf_counter() - started


def report(tally: Tally, wall: float, router_cpu: float, load_before: tuple[float, float, float]) -> str:
    completed = len(tally.latencies)
    lines = [
        "# Load: concurrent Generate streams through the router to the embedded backend",
        "",
        f"- Date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- Machine: {describe()}; load average before the run {', '.join(f'{x:.2f}' for x in load_before)}",
        f"- Method: `python -m bench load`. {STREAMS} streams started at once, each `Generate({FAMILY})` with "
        f"num_predict={NUM_PREDICT}, greedy, preferences latency/balanced/quality in turn. The router is a "
        f"separate `quantrouter serve` process (max_in_flight={ROUTER_CAPS['QUANTROUTER_MAX_IN_FLIGHT']}, "
        f"per family {ROUTER_CAPS['QUANTROUTER_MAX_IN_FLIGHT_PER_FAMILY']}); the embedded llama.cpp backend "
        f"(per-model queue {BACKEND_QUEUE}, 2 threads per model) and the clients share the benchmark process. "
        "A client retries RESOURCE_EXHAUSTED after the RetryInfo delay; latency runs from its first attempt "
        "to the completion, retries included.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| streams complete | {completed} / {STREAMS} |",
        f"| errors other than RESOURCE_EXHAUSTED | {sum(tally.errors.values())} |",
        f"| RESOURCE_EXHAUSTED refusals (retried) | {sum(tally.refusals.values())} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(tally.refusals.items())) or 'none'}) |",
        f"| fallback decisions (backend busy before the first token) | {tally.fallbacks} |",
        f"| latency p50 / p99 | {percentile(tally.latencies, 0.5):.2f} s / {percentile(tally.latencies, 0.99):.2f} s |"
        if completed else "| latency | no stream completed |",
        f"| time to first token p50 / p99 | {percentile(tally.first_tokens, 0.5):.2f} s / "
        f"{percentile(tally.first_tokens, 0.99):.2f} s |" if completed else "| time to first token | n/a |",
        f"| wall time | {wall:.1f} s ({completed / wall:.1f} streams/s) |",
        f"| router CPU (user + system, its own process) | {router_cpu:.2f} s "
        f"({router_cpu / max(completed, 1) * 1000:.1f} ms per stream, {router_cpu / wall * 100:.0f} % of a core) |",
        "",
        "Variants served: " + ", ".join(f"{tag} {n}" for tag, n in sorted(tally.variants.items())) + ".",
    ]
    if tally.errors:
        lines += ["", "Errors:", *(f"- {count} × {text}" for text, count in tally.errors.most_common())]
    lines += ["", "The latency is dominated by llama.cpp on two cores: every model serves one request at a time, so "
              "streams wait in the backend's queue; the router's own share is the CPU figure above."]
    return "\n".join(lines) + "\n"


# The burst.

BURST = 1000
BURST_CLIENTS = 10
BURST_RESULTS = RESULTS.parent / "load-1000.md"
BURST_CAPS = {"QUANTROUTER_MAX_IN_FLIGHT": "512", "QUANTROUTER_MAX_IN_FLIGHT_PER_FAMILY": "512",
              "QUANTROUTER_MEMORY_CAPACITY": "80GiB"}
BURST_TOKENS = 32
BURST_TOKENS_PER_S = 4.0  # 8 s a stream: the burst outlasts its own start, so the cap is reached
# The router's streaming pool closes a connection idle for STREAM_KEEPALIVE_S at its next sweep, which comes
# about that often: twice that, and the backend's sockets are closed.
POOL_EXPIRY_S = 2 * STREAM_KEEPALIVE_S
SETTLE_S = 1.0
# The clients' connections are closed this long before the last reading.
HANG_UP_S = 2.0
PROBE_TIMEOUT_S = 30.0
PROBE_POLL_S = 0.05


@dataclass
class BurstTally:
    completed: int = 0
    refused_with_retry: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Footprint:
    """Resident memory (MiB) and open sockets of a process."""

    rss_mib: float
    sockets: int


def footprint(pid: int) -> Footprint:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return Footprint(round(rss / 1024, 1), sum(link.startswith("socket:") for link in links))


async def burst_stream(stub: pb_grpc.RouterServiceStub, tally: BurstTally) -> None:
    request = pb.GenerateRequest(model=CANNED_FAMILY, prompt=PROMPTS[0],
                                 options=pb.GenerationOptions(num_predict=BURST_TOKENS))
    try:
        async for response in stub.Generate(request, timeout=STREAM_DEADLINE_S):
            if response.HasField("completion"):
                tally.completed += 1
                return
        tally.errors["stream ended without a completion"] += 1
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_details(error).retry_after is not None:
            tally.refused_with_retry += 1
        else:
            tally.errors[f"{error.code().name}: {error.details()}"] += 1


async def one_request(stub: pb_grpc.RouterServiceStub) -> None:
    tally = BurstTally()
    await burst_stream(stub, tally)
    if tally.completed != 1:
        raise RuntimeError(f"a single request through the router failed: {tally}")


@dataclass(frozen=True, slots=True)
class ProbedRouter:
    """The router under the burst (`python -m bench.memory_probe serve …`): its pid, the file its memory probe
    writes, and its log."""

    pid: int
    probe_file: Path
    log: Path

    def trims(self) -> list[str]:
        """The router's log lines so far that say it returned freed memory."""
        return [match.group(0) for match in _TRIMMED.finditer(self.log.read_text(errors="replace"))]

    async def reading(self) -> Reading:
        """Resident memory and sockets (/proc), then the probe's figures (SIGUSR1; it answers within a loop turn)."""
        taken = footprint(self.pid)
        count = len(read_figures(self.probe_file))
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while len(figures := read_figures(self.probe_file)) == count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router's memory probe did not answer within {PROBE_TIMEOUT_S:.0f} s")
            await asyncio.sleep(PROBE_POLL_S)
        return Reading(taken, figures[-1])


@dataclass(frozen=True, slots=True)
class Reading:
    """The router's resident memory and sockets, and who holds the memory (its probe's figures)."""

    footprint: Footprint
    memory: MemoryFigures


@dataclass(frozen=True, slots=True)
class Burst:
    """One burst: its answers, its wall time, the footprint at its end and the reading after the pool's idle time."""

    tally: BurstTally
    wall_s: float
    peak: Footprint
    after: Reading
    trims: tuple[str, ...]  # the router's log lines from giving freed memory back after it


@dataclass(frozen=True, slots=True)
class BurstRun:
    before: Reading
    first: Burst
    second: Burst
    hung_up: Reading  # once the clients closed their connections


async def one_burst(stubs: list[pb_grpc.RouterServiceStub], router: ProbedRouter) -> Burst:
    tally, trimmed = BurstTally(), len(router.trims())
    started = time.perf_counter()
    await asyncio.gather(*(burst_stream(stubs[i % BURST_CLIENTS], tally) for i in range(BURST)))
    wall = time.perf_counter() - started
    peak = Footprint(float(memory_peak_mib(router.pid)), footprint(router.pid).sockets)
    await one_request(stubs[0])  # the router still serves after the burst
    await asyncio.sleep(POOL_EXPIRY_S + SETTLE_S)
    return Burst(tally, wall, peak, await router.reading(), tuple(router.trims()[trimmed:]))


async def run_burst(target: str, router: ProbedRouter) -> BurstRun:
    """Warm up, let the pool's idle connections expire, take the baseline; then two bursts, each followed by
    one more request and the pool's idle time. The second tells memory the allocator keeps after a burst (the
    same again) from a leak (more again). Last, the clients hang up: what per-connection state held goes.

    The streams come from many clients, a connection each (as from many services), each warmed before the
    baseline: hundreds of streams at once on one grpc aio channel end CANCELLED in the client before the
    router ever sees them (observed here; the router's own metrics count only the calls it got)."""
    async with contextlib.AsyncExitStack() as stack:
        stubs = [pb_grpc.RouterServiceStub(await stack.enter_async_context(grpc.aio.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)]))) for _ in range(BURST_CLIENTS)]
        await asyncio.gather(*(one_request(stub) for stub in stubs))  # at once: one by one takes 8 s each
        await asyncio.sleep(POOL_EXPIRY_S + SETTLE_S)  # the warm-ups' backend connections close, as after the burst
        before = await router.reading()
        first = await one_burst(stubs, router)
        second = await one_burst(stubs, router)
    await asyncio.sleep(HANG_UP_S)
    return BurstRun(before, first, second, await router.reading())


def memory_peak_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return round(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024, 1)


# Memory may keep a little of what 1,000 streams allocated (Python's allocator keeps some arenas).
RSS_TOLERANCE_MIB = 8.0


def _answers(tally: BurstTally) -> str:
    errors = "; ".join(f"{n} × {text}" for text, n in tally.errors.most_common())
    return (f"{tally.completed:,} completed, {tally.refused_with_retry:,} refused with RetryInfo, "
            f"{sum(tally.errors.values())} other errors{f' ({errors})' if errors else ''}")


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def burst_report(run: BurstRun) -> str:
    before, first, second, hung_up = run.before, run.first, run.second, run.hung_up
    answered = all(b.tally.completed + b.tally.refused_with_retry == BURST and not b.tally.errors
                   for b in (first, second))
    sockets_back = (first.after.footprint.sockets <= before.footprint.sockets
                    and second.after.footprint.sockets <= before.footprint.sockets)
    rss_back = first.after.footprint.rss_mib <= before.footprint.rss_mib + RSS_TOLERANCE_MIB
    verdict = "pass" if answered and sockets_back and rss_back else "**fail**"
    grown = second.after.footprint.rss_mib - first.after.footprint.rss_mib
    lines = [
        f"# Load: {BURST:,} concurrent streams through one router", "",
        f"- Date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- Machine: {describe()}",
        f"- Method: `python -m bench.load --burst`. {BURST:,} `Generate({CANNED_FAMILY})` streams started at once "
        f"from {BURST_CLIENTS} clients (a connection each), no retries, {BURST_TOKENS} tokens each from the canned "
        "Ollama fixture at "
        f"{BURST_TOKENS_PER_S:.0f} tok/s a stream; the router (its own process) caps in-flight streams at "
        f"{BURST_CAPS['QUANTROUTER_MAX_IN_FLIGHT']}. Memory and sockets are the router process's (/proc), before the "
        "first burst (after a warm-up request on each client) and after each burst (after one more request), each "
        f"time {POOL_EXPIRY_S + SETTLE_S:.0f} s on, by when the router's backend pool has closed its idle "
        "connections; the clients' connections stay open until both bursts are over, then close, and a last "
        f"reading follows {HANG_UP_S:.0f} s later. A second burst follows the first, so that memory the allocator "
        "keeps after a burst (the same again) shows apart from a leak (more again). Who holds the memory comes "
        "from inside the router: it runs as `python -m bench.memory_probe serve …` (this checkout's router, "
        "unchanged), which on each reading reports glibc malloc's bytes in use and CPython's small-object "
        "allocator (`sys._debugmallocstats`: its 1 MiB arenas, the bytes allocated in them and the free space inside "
        "them); it only reads.",
        f"- Verdict: {verdict} (it passes when every stream of both bursts completed or was refused with "
        f"RetryInfo, no other error, sockets back to the baseline, resident memory after the first burst within "
        f"{RSS_TOLERANCE_MIB:.0f} MiB of it). After the second burst resident memory is {abs(grown):.1f} MiB "
        f"{'above' if grown > 0 else 'below'} where the first left it.", "",
        "| figure | before | after the first burst | after the second burst | after the clients hung up |",
        "|---|---|---|---|---|",
        f"| answers | — | {_answers(first.tally)} | {_answers(second.tally)} | — |",
        f"| wall time | — | {first.wall_s:.1f} s | {second.wall_s:.1f} s | — |",
        f"| router resident memory, MiB (peak) | {before.footprint.rss_mib} | {first.after.footprint.rss_mib} "
        f"({first.peak.rss_mib}) | {second.after.footprint.rss_mib} ({second.peak.rss_mib}) | "
        f"{hung_up.footprint.rss_mib} |",
        f"| router open sockets (at the burst's end) | {before.footprint.sockets} | {first.after.footprint.sockets} "
        f"({first.peak.sockets}) | {second.after.footprint.sockets} ({second.peak.sockets}) | "
        f"{hung_up.footprint.sockets} |",
        *(f"| {label} | {' | '.join(cell(r.memory) for r in (before, first.after, second.after, hung_up))} |"
          for label, cell in _MEMORY_ROWS),
        f"| the router's log after the burst (quantrouter.allocator) | — | {_trims(first)} | {_trims(second)} | — |",
        "", f"**Who holds the memory (generated from this run).** {_memory_reading(run)}",
    ]
    return "\n".join(lines) + "\n"


_MEMORY_ROWS: tuple[tuple[str, Callable[[MemoryFigures], str]], ...] = (
    ("CPython small-object arenas: count (MiB)", lambda m: f"{m.arenas} ({m.arenas_mib:.0f})"),
    ("… blocks allocated in them, MiB (count)", lambda m: f"{m.arenas_live_mib:.1f} ({m.blocks:,})"),
    ("… free space inside them, MiB", lambda m: f"{m.arenas_free_mib:.1f}"),
    ("glibc malloc in use, MiB", lambda m: _mib(m.malloc_in_use_mib)),
)


def _trims(burst: Burst) -> str:
    return "; ".join(burst.trims) or "no trim"


def _memory_reading(run: BurstRun) -> str:
    """Where the resident memory above the baseline after the first burst sits, from the probe's figures."""
    before, after, hung_up = run.before, run.first.after, run.hung_up
    m0, m1 = before.memory, after.memory
    grown = after.footprint.rss_mib - before.footprint.rss_mib
    arenas = m1.arenas_mib - m0.arenas_mib
    live = m1.arenas_live_mib - m0.arenas_live_mib
    malloc = (m1.malloc_in_use_mib - m0.malloc_in_use_mib
              if m1.malloc_in_use_mib is not None and m0.malloc_in_use_mib is not None else None)
    rest = grown - arenas - (malloc or 0.0)
    per_arena = (m1.blocks - m0.blocks) / max(m1.arenas - m0.arenas, 1)
    hang_up = hung_up.footprint.rss_mib - run.second.after.footprint.rss_mib
    text = f"Resident memory is {grown:.1f} MiB above the baseline after the first burst."
    if m1.arenas:
        text += (f" CPython's small-object allocator holds {arenas:.0f} MiB of it: {m1.arenas - m0.arenas} more "
                 f"arenas of {m1.arenas_mib / m1.arenas:.0f} MiB ({m0.arenas} → {m1.arenas}) than before, while the "
                 f"blocks allocated in them grew by {live:.2f} MiB ({m1.blocks - m0.blocks:+,} blocks, "
                 f"{per_arena:.0f} for each new arena); {m1.arenas_free_mib:.1f} MiB inside the arenas is free, and "
                 "CPython returns an arena only once its last block is free: the blocks the burst left allocated "
                 "(objects still alive, or kept on a free list for reuse), scattered through the arenas its peak "
                 "took, keep every one of them resident.")
    else:
        text += " CPython's small-object allocator is off (PYTHONMALLOC): every object comes from malloc."
    if malloc is not None:
        text += f" glibc malloc has {malloc:+.1f} MiB in use ({m0.malloc_in_use_mib:.1f} → {m1.malloc_in_use_mib:.1f})"
        text += f"; {rest:.1f} MiB is the rest, which neither reading accounts for."
    text += (f" When the clients hung up, resident memory changed by {hang_up:+.1f} MiB: "
             + ("the memory is not per-connection state." if abs(hang_up) < 1.0 else
                "part of it was per-connection state."))
    return text


def burst() -> None:
    with tempfile.TemporaryDirectory() as temporary, \
            canned_ollama("canned", BURST_TOKENS_PER_S, Path(temporary)) as backend:
        probe_file = Path(temporary) / "memory.jsonl"
        argv = [sys.executable, "-m", "bench.memory_probe", *SERVE_ARGUMENTS, "--ollama-host", backend.address]
        env = {**router_env(BURST_CAPS), PROBE_FILE_VARIABLE: str(probe_file)}
        with spawned("router", argv, env, ROUTER_READY, Path(temporary)) as router:
            run = asyncio.run(run_burst(f"127.0.0.1:{router.address}", ProbedRouter(router.pid, probe_file,
                                                                                    router.log)))
    text = burst_report(run)
    BURST_RESULTS.write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", action="store_true", help="run the 1,000-stream burst alone (load-1000.md)")
    args = parser.parse_args()
    burst()
    if args.burst:
        return
    cache_dir = default_cache_dir(os.environ)
    prepare_ladder(cache_dir, progress=False)
    load_before = os.getloadavg()
    config = EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=4 * GiB, max_queue=BACKEND_QUEUE)
    with run_embedded_in_thread(config) as backend, tempfile.TemporaryDirectory() as logs, \
            node_router("router", backend.url, Path(logs),
                        router_env({**ROUTER_CAPS, "QUANTROUTER_MEMORY_CAPACITY": "4GiB"})) as router:
        cpu_before = cpu_seconds(router.pid)
        tally, wall = asyncio.run(run_load(f"127.0.0.1:{router.address}"))
        router_cpu = cpu_seconds(router.pid) - cpu_before
    text = report(tally, wall, router_cpu, load_before)
    RESULTS.write_text(text)
    print(text)
    if tally.errors or len(tally.latencies) != STREAMS:
        raise SystemExit(f"load test failed: {sum(tally.errors.values())} errors, "
                         f"{len(tally.latencies)}/{STREAMS} complete")


if __name__ == "__main__":
    main()
