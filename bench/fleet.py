"""Fleet benchmark: the multi-node simulation, a real three-node run, and the time to first token the fleet
hop adds. Writes bench/results/fleet.md, both parts generated from their own run.

Simulation (bench/simulate_fleet.py): quantrouter-fleet against round-robin and least-loaded with
always-Q4_K_M and two oracles, on several simulated Ollama nodes; about three minutes on two cores.

Real run: three nodes, each a node router (`quantrouter serve`) in front of its own backend, with GPU memory
capacities of an RTX 4090, an L40S and an H100 (24, 48 and 80 GiB), one fleet router
(`quantrouter serve --node ...`) over them, and the bare relay: eight processes besides this client. The
backends are the canned Ollama fixture paced at a GPU-like decode rate (bench.fixtures.canned_ollama, Llama
3.1 8B in three quantizations), so that what is measured is the routing, not a model on two shared cores.

1. Spread: `concurrency` streams send requests through the fleet, preferences in turn (quality,
   balanced, latency); each stream's decision names the node and the variant, counted per pair.
2. Hop: one stream sends a request through the fleet, and the same request (the variant the fleet
   chose last, pinned) straight to the node router it chose and through a bare gRPC relay in front of that
   node (bench.fixtures.bare_relay: no validation, decision or interceptors); the three arms take each
   position in a round in turn (the fleet first, second, third), so all three see the same node, the same
   machine and the same share of whatever a request leaves behind for the next. TTFT is from the call to the first text
   chunk; the added TTFT is p50(arm) − p50(direct) and p99(arm) − p99(direct), and the median of the
   paired differences with their p10–p90 (bench.stats.paired). The relay's is the floor under any Python
   gRPC hop on this machine: what the fleet adds beyond it is the fleet's own work.

Run: `python -m bench.fleet [--only simulation|real] [--seeds N] [--quick]`. `--only` reruns one part and
keeps the other as the results file has it; `--quick` prints a small run of each and writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.fixtures.canned_ollama import FAMILY, VARIANTS
from bench.machine import CLOCK_TICKS, cpu_seconds, describe
from bench.overhead import ROUTER_ENV
from bench.processes import Service, canned_ollama, fleet_router, node_flags, node_router, spawned
from bench.simulate_fleet import DEFAULT_SEEDS, simulate
from bench.stats import Paired, paired, percentile
from quantrouter.client import AsyncRouterClient, Options, PreferenceName
from quantrouter.values import Decision

RESULTS = Path(__file__).parent / "results"
PROMPT = "Why is the sky blue?"
NODES = {"rtx4090-24g": "24GiB", "l40s-48g": "48GiB", "h100-80g": "80GiB"}
PREFERENCES: tuple[PreferenceName, ...] = ("quality", "balanced", "latency")
TOKENS_PER_SECOND = 50.0
SPREAD_TOKENS = 48
HOP_TOKENS = 4
REQUEST_TIMEOUT_S = 60.0
# Issue 14's acceptance: the fleet hop adds at most this much to the p50 time to first token.
TARGET_HOP_MS = 2.0
# The fleet router's idle CPU (its node reports) is read over this long before the hop pairs. Process CPU times
# come in clock ticks (10 ms): over the 2 s this was, the rate could only read 0, 5, 10 … ms a second, and one
# tick more read as the idle CPU doubling (5.0 → 10.0 ms/s between two runs); over 10 s, 1 ms a second.
IDLE_S = 10.0
# Reports every 200 ms, so a node's new streams show in the fleet's next choices.
FLEET_ENV = {**ROUTER_ENV, "QUANTROUTER_NODE_REPORT_INTERVAL": "0.2s", "QUANTROUTER_NODE_STALE_AFTER": "3s"}


@dataclass(frozen=True, slots=True)
class Plan:
    concurrency: int
    spread_requests: int
    hop_pairs: int


def plan(quick: bool) -> Plan:
    """Bounded so the whole run stays near two minutes on two shared cores."""
    return Plan(2, 12, 20) if quick else Plan(6, 90, 200)


def node_backend(name: str, logs: Path) -> contextlib.AbstractContextManager[Service]:
    """The canned Ollama fixture for one node, paced at `TOKENS_PER_SECOND` a stream."""
    return canned_ollama(f"backend-{name}", TOKENS_PER_SECOND, logs)


@dataclass(frozen=True, slots=True)
class Fleet:
    """The running processes: the fleet router, each node's router, the bare relay and its port per node."""

    router: Service
    nodes: dict[str, Service]
    relay: Service
    relay_ports: dict[str, str]


@contextlib.contextmanager
def fleet(logs: Path) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:
        routers = {}
        for name, capacity in NODES.items():
            backend = stack.enter_context(node_backend(name, logs))
            routers[name] = stack.enter_context(node_router(f"router-{name}", backend.address, logs, ROUTER_ENV,
                                                            capacity))
        router = stack.enter_context(fleet_router("fleet", routers, logs, FLEET_ENV))
        relay = stack.enter_context(spawned("bare-relay", [sys.executable, "-m", "bench.fixtures.bare_relay",
                                                           *node_flags(routers)],
                                            {}, r"bare relay serving on ports (\S+)", logs))
        yield Fleet(router, routers, relay, dict(pair.split("=") for pair in relay.address.split(",")))


async def first_token(client: AsyncRouterClient, model: str, preference: PreferenceName,
                      tokens: int) -> tuple[Decision, float]:
    started = time.perf_counter()
    decision, first = None, None
    async for event in client.generate(model, PROMPT, preference=preference, timeout=REQUEST_TIMEOUT_S,
                                       options=Options(num_predict=tokens, temperature=0.0)):
        if isinstance(event, Decision) and decision is None:
            decision = event
        elif isinstance(event, str) and first is None:
            first = time.perf_counter()
    assert decision is not None and first is not None, "a stream without a decision or text"
    return decision, first - started


async def warm(routers: dict[str, Service]) -> None:
    """One request per variant straight to each node router, so that every node reports measured speeds: a node
    with a static capacity and no samples has only the no-GPU prior (a few tok/s), which a fleet would never
    try while its measured peers look ten times faster (a node in production measures itself on its first
    requests; its GPU's name gives a realistic prior before that)."""
    for router in routers.values():
        async with AsyncRouterClient(f"127.0.0.1:{router.address}") as client:
            for variant in VARIANTS:
                await first_token(client, variant.tag, "quality", HOP_TOKENS)


async def spread(target: str, p: Plan) -> tuple[Counter[tuple[str, str, str]], int]:
    counts: Counter[tuple[str, str, str]] = Counter()
    failed = 0
    queue = [PREFERENCES[i % len(PREFERENCES)] for i in range(p.spread_requests)]

    async def stream(client: AsyncRouterClient) -> None:
        nonlocal failed
        while queue:
            preference = queue.pop()
            try:
                decision, _ = await first_token(client, FAMILY, preference, SPREAD_TOKENS)
            except Exception:  # a failed request is a result: counted, not fatal
                failed += 1
                continue
            counts[(decision.node, decision.chosen.tag if decision.chosen else "", preference)] += 1

    async with AsyncRouterClient(target) as client:
        await asyncio.gather(*(stream(client) for _ in range(p.concurrency)))
    return counts, failed


@dataclass(frozen=True, slots=True)
class Hop:
    """The hop's paired TTFTs (seconds: through the fleet, through the bare relay, straight to the node), the fleet
    router's and the bare relay's CPU seconds over them and their wall time, and the fleet router's CPU seconds a
    second while idle (its node subscriptions' reports)."""

    through: list[float]
    relayed: list[float]
    direct: list[float]
    fleet_cpu_s: float
    relay_cpu_s: float
    wall_s: float
    idle_cpu_per_s: float


async def hop(running: Fleet, p: Plan) -> Hop:
    through: list[float] = []
    relayed: list[float] = []
    direct: list[float] = []
    target = f"127.0.0.1:{running.router.address}"
    clients = {name: AsyncRouterClient(f"127.0.0.1:{r.address}") for name, r in running.nodes.items()}
    relays = {name: AsyncRouterClient(f"127.0.0.1:{port}") for name, port in running.relay_ports.items()}
    try:
        async with AsyncRouterClient(target) as fleet_client:
            for name in clients:  # warm every connection
                await first_token(clients[name], FAMILY, "quality", HOP_TOKENS)
                await first_token(relays[name], FAMILY, "quality", HOP_TOKENS)
            idle_started, idle_cpu = time.perf_counter(), cpu_seconds(running.router.pid)
            await asyncio.sleep(IDLE_S)
            idle_cpu_per_s = (cpu_seconds(running.router.pid) - idle_cpu) / (time.perf_counter() - idle_started)
            cpu_before, relay_before, started = 0.0, 0.0, 0.0
            for index in range(p.hop_pairs + 1):
                if index == 1:
                    cpu_before, started = cpu_seconds(running.router.pid), time.perf_counter()
                    relay_before = cpu_seconds(running.relay.pid)
                arms: list[list[float] | None] = [None, direct, relayed]  # None: through the fleet
                turn = index % len(arms)  # the first round (index 0) starts with the fleet: it picks the node
                for samples in arms[turn:] + arms[:turn]:
                    if samples is None:
                        decision, ttft = await first_token(fleet_client, FAMILY, "quality", HOP_TOKENS)
                        samples = through
                    else:
                        assert decision.chosen is not None  # the fleet's latest pick: this round's or the last
                        arm = clients if samples is direct else relays
                        _, ttft = await first_token(arm[decision.node], decision.chosen.tag, "quality", HOP_TOKENS)
                    if index:  # the first round warms the fleet's own connections
                        samples.append(ttft)
        fleet_cpu, wall = cpu_seconds(running.router.pid) - cpu_before, time.perf_counter() - started
        relay_cpu = cpu_seconds(running.relay.pid) - relay_before
    finally:
        for client in (*clients.values(), *relays.values()):
            await client.close()
    return Hop(through, relayed, direct, fleet_cpu, relay_cpu, wall, idle_cpu_per_s)


def quantile_ms(seconds: list[float], q: float) -> float:
    return 1000 * percentile(seconds, q)


def added_ms(arm: list[float], base: list[float], q: float) -> float:
    """What `arm` adds to `base` at quantile `q`, in ms."""
    return quantile_ms(arm, q) - quantile_ms(base, q)


def paired_ms(arm: list[float], base: list[float]) -> Paired:
    """`arm` − `base` in ms, round by round."""
    return paired([1000 * a for a in arm], [1000 * b for b in base])


def hop_reading(measured: Hop) -> str:
    """The hop's figures in words: the fleet's, the bare relay's (the floor) and the fleet's own beyond it."""
    through, relayed, direct = measured.through, measured.relayed, measured.direct
    added, floor = added_ms(through, direct, 0.5), added_ms(relayed, direct, 0.5)
    text = (f"The fleet hop added {added:.2f} ms to time to first token at p50 (issue 14's target ≤ "
            f"{TARGET_HOP_MS:g} ms: {'holds' if added <= TARGET_HOP_MS else 'missed'}) and "
            f"{added_ms(through, direct, 0.99):.2f} ms at p99 over {len(through)} rounds (median paired difference "
            f"{paired_ms(through, direct).text('ms')}); ratio of p50s "
            f"{quantile_ms(through, 0.5) / quantile_ms(direct, 0.5):.3f}. In the same rounds a bare gRPC relay "
            f"(bench/fixtures/bare_relay.py: no validation, decision, interceptors or metrics, the same loop) "
            f"added {floor:.2f} ms at p50 (median paired difference {paired_ms(relayed, direct).text('ms')}): the "
            f"floor under any Python gRPC hop here. The fleet's own work (reading the request, the decision over "
            f"every node's variants, interceptors, metrics) added {added - floor:.2f} ms beyond it at p50 (median "
            f"paired difference fleet − relay {paired_ms(through, relayed).text('ms')}).")
    if added <= TARGET_HOP_MS:
        return text
    if floor > TARGET_HOP_MS:
        return text + f" The floor alone is over the {TARGET_HOP_MS:g} ms target on this machine."
    return text + (f" The target is missed by {added - TARGET_HOP_MS:.2f} ms; the floor leaves the fleet "
                   f"{TARGET_HOP_MS - floor:.2f} ms for its own work.")


def report(p: Plan, counts: Counter[tuple[str, str, str]], failed: int, measured: Hop, seconds: float,
           load: float) -> str:
    through, relayed, direct = measured.through, measured.relayed, measured.direct
    fleet_cpu_ms = 1000 * measured.fleet_cpu_s / len(through)
    relay_cpu_ms = 1000 * measured.relay_cpu_s / len(relayed)
    reports_ms = 1000 * measured.idle_cpu_per_s * measured.wall_s / len(through)
    added_p50 = added_ms(through, direct, 0.5)
    per_node = Counter(node for node, _, _ in counts.elements())
    busiest = max(per_node.values()) / sum(per_node.values()) if per_node else float("nan")
    quantiles = (0.5, 0.9, 0.99)
    lines = [
        "## A real three-node run", "",
        f"Run {datetime.now():%Y-%m-%d %H:%M} on {describe()}; {seconds:.0f} s in all. "
        "Regenerate this part alone with `python -m bench.fleet --only real`.", "",
        f"**Reading (generated from this run).** {sum(counts.values())} requests from {p.concurrency} streams went to "
        f"{len(per_node)} of {len(NODES)} nodes (the busiest took {busiest:.0%}); {failed} failed. "
        f"{hop_reading(measured)} Client, eight router, relay and backend processes share this machine's cores (load "
        f"average {load:.1f} when the run started). "
        f"Over these rounds the fleet router spent {fleet_cpu_ms:.2f} ms of CPU a request (its own process), of "
        f"which its node subscriptions' reports took about {reports_ms:.2f} ms (its CPU rate when idle, "
        f"{1000 * measured.idle_cpu_per_s:.1f} ms a second over {IDLE_S:g} s idle, read in "
        f"{1000 / CLOCK_TICKS:g} ms clock ticks, over the rounds' wall time) and the request itself "
        f"{fleet_cpu_ms - reports_ms:.2f} ms (the decision over every node's variants, the call in from the client "
        f"and the call out to the node, every message relayed); the bare relay spent {relay_cpu_ms:.2f} ms a request "
        f"in the same rounds, so the fleet's own work cost {fleet_cpu_ms - reports_ms - relay_cpu_ms:.2f} ms of CPU "
        "a request beyond it"
        + (f", against the {TARGET_HOP_MS:g} ms the whole hop may add: on a machine whose cores every process shares, "
           "that CPU is time the first token waits for." if added_p50 > TARGET_HOP_MS else "."), "",
        f"Nodes: node routers with static capacities {', '.join(f'{n} = {c}' for n, c in NODES.items())}, "
        f"each in front of the canned Ollama fixture at {TOKENS_PER_SECOND:.0f} tok/s a stream "
        "(Llama 3.1 8B: Q8_0, Q5_K_M, Q4_K_M, all resident, as on a warm Ollama); each node served one request "
        "per variant first, so that every node's speeds are measured.", "",
        f"### Requests per node and variant ({SPREAD_TOKENS} tokens each, preferences in turn)", "",
        "| node | variant | preference | requests |", "|---|---|---|---|",
        *[f"| {node} | {tag} | {pref} | {n} |" for (node, tag, pref), n in sorted(counts.items())], "",
        f"### Time to first token: through the fleet, through a bare relay, straight to the node the fleet chose "
        f"({HOP_TOKENS} tokens each)", "",
        "| arm | requests | p50 (ms) | p90 (ms) | p99 (ms) |", "|---|---|---|---|---|",
        *[f"| {arm} | {len(v)} | " + " | ".join(f"{quantile_ms(v, q):.2f}" for q in quantiles) + " |"
          for arm, v in (("fleet → node", through), ("bare relay → node", relayed), ("node direct", direct))],
        *[f"| {what} | | " + " | ".join(f"{added_ms(arm, base, q):.2f}" for q in quantiles) + " |"
          for what, arm, base in (("added by the fleet hop", through, direct),
                                  ("added by the bare relay (the floor)", relayed, direct),
                                  ("the fleet's own, beyond the floor", through, relayed))],
    ]
    return "\n".join(lines) + "\n"


PARTS = ("simulation", "real")
HEADER = ("# Fleet benchmarks\n\nGenerated by `python -m bench.fleet` (bench/fleet.py explains the method); each part "
          "says when and where it ran. `--only simulation` or `--only real` reruns one part and keeps the other.\n")


def marker(part: str) -> str:
    return f"<!-- part: {part} -->"


def parts_of(text: str) -> dict[str, str]:
    """The parts of a results file as `compose` wrote it (none for a file without markers)."""
    parts = {}
    for part in PARTS:
        start = text.find(marker(part))
        if start >= 0:
            ends = [i for other in PARTS if (i := text.find(marker(other), start + 1)) > start]
            parts[part] = text[start + len(marker(part)):min(ends, default=len(text))].strip("\n") + "\n"
    return parts


def compose(parts: dict[str, str]) -> str:
    return HEADER + "".join(f"\n{marker(part)}\n{parts[part]}" for part in PARTS if part in parts)


def real_run(quick: bool) -> str:
    p = plan(quick)
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as logs, fleet(Path(logs)) as running:
        target = f"127.0.0.1:{running.router.address}"
        asyncio.run(warm(running.nodes))
        time.sleep(1.0)  # the fleet's reports of every node's measured speeds
        counts, failed = asyncio.run(spread(target, p))
        measured = asyncio.run(hop(running, p))
    return report(p, counts, failed, measured, time.perf_counter() - started, load)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PARTS, help="rerun this part and keep the other from the results file")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="simulated traces per scenario")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="simulation processes")
    parser.add_argument("--scenarios", nargs="*", default=None, help="only these simulated scenarios")
    parser.add_argument("--quick", action="store_true", help="a small run of each part, printed, nothing written")
    args = parser.parse_args(argv)
    path = RESULTS / "fleet.md"
    parts = parts_of(path.read_text()) if path.exists() else {}
    if args.only in (None, "simulation"):
        parts["simulation"] = simulate(2 if args.quick else args.seeds, args.workers, args.scenarios)
        print(parts["simulation"])
    if args.only in (None, "real"):
        parts["real"] = real_run(args.quick)
        print(parts["real"])
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        path.write_text(compose(parts))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
