"""Replay: one seeded trace through router → embedded llama.cpp backend, once per routing policy.

`python -m bench.replay [--seed N ...] [--requests N] [--rate R] [--budget SIZE] [--out DIR] [--quick]`

Policies, all through the same router so that only the choice differs (the static ones as pinned tags):
- quantrouter: the family name and the request's preference; the router decides;
- always-q4_K_M: every request pinned to the Q4_K_M variant;
- file×1.2 fits: the highest-precision variant whose file × 1.2 fits the budget, fixed at start (the
  common "GB per billion parameters × 1.2" rule);
- largest-fits-free: per request, the highest-precision variant that is resident or whose file fits the
  memory free now (from the router's ListVariants).

The trace: Poisson arrivals at `--rate`, a QUALITY/BALANCED/LATENCY mix, prompts and num_predict from
`PROMPTS` and `NUM_PREDICT`, and per request a deadline scaled to this machine: the preference's slack × the time
Q4_K_M would take at the calibration's measured speeds (`--calibration`, the committed
bench/results/calibration-gemma3-270m.json). The deadline is the call's gRPC deadline, so the router sees
it too. The backend's memory budget (default 1.75 GiB) is below the whole ladder (≈ 7 GiB charged), so
only a few variants fit at once.

Scoring: a request counts when it completed before its deadline, weighted by the served variant's
measured quality (top-1 agreement with F16, from the calibration). Goodput = Σ quality over requests
that met their deadline ÷ the trace's arrival span (the same for every policy of a seed). Reported per
policy over seeds: goodput (mean and min–max), its ratio to always-q4_K_M in the same seed, deadline met
per preference, p50/p95 latency of completed requests, model loads and evictions. Writes replay.md,
replay.csv (one row per request) and replay.png under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from bench.machine import describe
from bench.router_settings import add_setting_option, settings_of
from bench.stats import percentile
from quantrouter.calibration import VariantCalibration, read_calibration
from quantrouter.client import AsyncRouterClient, Completion, Options, PreferenceName, VariantListing
from quantrouter.config import Settings, default_cache_dir, load_settings, parse_bytes, with_keys
from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, run_embedded_in_thread
from quantrouter.server import run_in_thread

RESULTS = Path(__file__).parent / "results"
CALIBRATION = RESULTS / "calibration-gemma3-270m.json"
FAMILY = "gemma3:270m"
PINNED = f"{FAMILY}-q4_K_M"
BASELINE = "always-q4_K_M"
POLICIES = ("quantrouter", BASELINE, "file×1.2 fits", "largest-fits-free")
DEFAULT_BUDGET = "1792MiB"
RULE_OF_THUMB = 1.2
# (preference, share of requests, deadline slack × Q4_K_M's expected time)
MIX: tuple[tuple[PreferenceName, float, float], ...] = (("quality", 0.3, 6.0), ("balanced", 0.4, 3.0),
                                                        ("latency", 0.3, 1.5))
# Seconds added to every deadline: the router's and the backend's fixed costs, which no speed covers.
DEADLINE_FLOOR_S = 0.5
# The trace spec: prompts drawn uniformly, num_predict by weight.
PROMPTS = ("Explain in two sentences why the sky is blue.", "Write a haiku about autumn rain.",
           "List three uses of a hash map.", "What is the capital of Australia?",
           "Summarise the plot of a detective story in one paragraph.",
           "Write a Python function that reverses a string.")
NUM_PREDICT = (16, 32, 64)
NUM_PREDICT_WEIGHTS = (0.4, 0.4, 0.2)
PROMPT_TOKENS_GUESS = 24  # the chat-templated prompts above are 20–30 tokens
@dataclass(frozen=True, slots=True)
class Preset:
    seeds: tuple[int, ...]
    requests: int
    rate: float


FULL = Preset((1, 2, 3), 20, 0.25)
QUICK = Preset((1,), 8, 0.25)
START_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Request:
    index: int
    at: float  # seconds after the trace starts
    preference: PreferenceName
    prompt: str
    num_predict: int
    deadline: float


@dataclass(frozen=True, slots=True)
class Outcome:
    seed: int
    policy: str
    index: int
    preference: str
    num_predict: int
    deadline: float
    variant: str
    latency: float
    status: str
    met: bool
    quality: float


def make_trace(seed: int, count: int, rate: float, reference_speed: VariantCalibration) -> list[Request]:
    """Poisson arrivals and the request mix, all from `seed` (pure)."""
    rng = random.Random(seed)
    preferences = [p for p, _, _ in MIX]
    shares = [s for _, s, _ in MIX]
    slack = {p: s for p, _, s in MIX}
    at, trace = 0.0, []
    for index in range(count):
        at += rng.expovariate(rate)
        preference = rng.choices(preferences, shares)[0]
        num_predict = rng.choices(NUM_PREDICT, NUM_PREDICT_WEIGHTS)[0]
        expected = PROMPT_TOKENS_GUESS / reference_speed.prompt_tps + num_predict / reference_speed.decode_tps
        trace.append(Request(index, at, preference, rng.choice(PROMPTS), num_predict,
                             DEADLINE_FLOOR_S + slack[preference] * expected))
    return trace


def _by_precision(listing: VariantListing) -> list[tuple[str, int, bool]]:
    """(tag, file size, resident), highest precision first (the listing's order: best quality prior first)."""
    return [(v.tag, v.size_bytes, v.resident) for v in listing.families[FAMILY]]


def rule_of_thumb_tag(listing: VariantListing, budget: int) -> str:
    """The highest-precision variant whose file × 1.2 fits the budget."""
    fitting = [tag for tag, size, _ in _by_precision(listing) if size * RULE_OF_THUMB <= budget]
    return fitting[0] if fitting else _by_precision(listing)[-1][0]


def largest_fitting_free(listing: VariantListing) -> str:
    """The highest-precision variant already resident or whose file fits the memory free now."""
    for tag, size, resident in _by_precision(listing):
        if resident or size <= listing.free_bytes:
            return tag
    return _by_precision(listing)[-1][0]


async def _serve(client: AsyncRouterClient, request: Request, model: str, seed: int, policy: str,
                 qualities: dict[str, float]) -> Outcome:
    started = time.perf_counter()
    variant, status = "", "OK"
    try:
        async for event in client.generate(model, request.prompt, preference=request.preference,
                                           options=Options(num_predict=request.num_predict, temperature=0.0, seed=1),
                                           timeout=request.deadline):
            if isinstance(event, Completion):
                variant = event.variant
    except grpc.aio.AioRpcError as error:
        status = error.code().name
    latency = time.perf_counter() - started
    met = status == "OK" and latency <= request.deadline
    return Outcome(seed, policy, request.index, request.preference, request.num_predict, round(request.deadline, 3),
                   variant, round(latency, 3), status, met, qualities.get(variant, 0.0))


async def _replay(target: str, trace: Sequence[Request], seed: int, policy: str, budget: int,
                  qualities: dict[str, float]) -> list[Outcome]:
    async with AsyncRouterClient(target) as client:
        listing = await client.list_variants(FAMILY)
        fixed = rule_of_thumb_tag(listing, budget)
        start = time.perf_counter()
        tasks = []
        for request in trace:
            await asyncio.sleep(max(0.0, start + request.at - time.perf_counter()))
            if policy == "quantrouter":
                model = FAMILY
            elif policy == BASELINE:
                model = PINNED
            elif policy == "file×1.2 fits":
                model = fixed
            else:
                model = largest_fitting_free(await client.list_variants(FAMILY))
            tasks.append(asyncio.ensure_future(_serve(client, request, model, seed, policy, qualities)))
        return list(await asyncio.gather(*tasks))


def _router_settings(backend: EmbeddedServer, calibration: Path, settings: Mapping[str, str]) -> Settings:
    """The router's settings, with `settings` (name → value, as `--setting` gives them) cast and checked as flags."""
    return with_keys(load_settings({"grpc_address": "127.0.0.1:0", "metrics_address": "127.0.0.1:0",
                                    "ollama_host": backend.url, "memory_capacity": backend.memory_budget_bytes,
                                    "memory_reserve": 0, "ps_refresh_interval": 0.2,
                                    "calibration_file": str(calibration)}, {}), settings)


def run_policy(trace: Sequence[Request], seed: int, policy: str, budget: int, calibration: Path,
               qualities: dict[str, float], settings: Mapping[str, str]) -> tuple[list[Outcome], tuple[int, int]]:
    """A fresh backend and router (nothing resident), the whole trace, then the backend's load counts."""
    config = EmbeddedConfig(cache_dir=default_cache_dir({}), memory_budget_bytes=budget)
    with run_embedded_in_thread(config) as backend, \
            run_in_thread(_router_settings(backend, calibration, settings), CollectorRegistry()) as router:
        outcomes = asyncio.run(_replay(f"127.0.0.1:{router.port}", trace, seed, policy, budget, qualities))
        _wait_until_idle(backend)  # past their deadline, generations still run in the backend
        return outcomes, backend.load_counts()


def _wait_until_idle(backend: EmbeddedServer, timeout: float = 300.0) -> None:
    """Stopping the backend frees its models: wait until none is generating, so none is freed mid-token."""
    ends = time.monotonic() + timeout
    while any(m.busy for m in backend.resident()) and time.monotonic() < ends:
        time.sleep(0.2)


@dataclass(frozen=True, slots=True)
class Summary:
    policy: str
    goodput: list[float]
    ratio: list[float]
    met: dict[str, float]
    p50: float
    p95: float
    loads: int
    evictions: int


def summarise(outcomes: Sequence[Outcome], spans: dict[int, float],
              counts: dict[tuple[int, str], tuple[int, int]]) -> list[Summary]:
    """Per policy over seeds (pure)."""
    seeds = sorted(spans)

    def goodput(policy: str, seed: int) -> float:
        return sum(o.quality for o in outcomes if o.policy == policy and o.seed == seed and o.met) / spans[seed]

    summaries = []
    for policy in POLICIES:
        mine = [o for o in outcomes if o.policy == policy]
        if not mine:
            continue
        latencies = [o.latency for o in mine if o.status == "OK"]
        met: dict[str, float] = {p: statistics.fmean(o.met for o in mine if o.preference == p)
               for p, _, _ in MIX if any(o.preference == p for o in mine)}
        per_seed = [goodput(policy, s) for s in seeds]
        base = [goodput(BASELINE, s) for s in seeds]
        ratio = [g / b if b else 0.0 for g, b in zip(per_seed, base, strict=True)]
        loads = sum(counts[(s, policy)][0] for s in seeds)
        evictions = sum(counts[(s, policy)][1] for s in seeds)
        summaries.append(Summary(policy, per_seed, ratio, met, percentile(latencies, 0.5),
                                 percentile(latencies, 0.95), loads, evictions))
    return summaries


def format_report(summaries: Sequence[Summary], args: argparse.Namespace, seeds: Sequence[int], took: float,
                  calibration: Path) -> str:
    lines = ["# Replay: a seeded trace through router → embedded llama.cpp, per policy", "",
             f"Machine: {describe()}; {datetime.now(UTC).isoformat(timespec='seconds')}; "
             f"took {took / 60:.1f} min.", "",
             f"Command: `python -m bench.replay {' '.join(sys.argv[1:])}`. Seeds {', '.join(map(str, seeds))}; "
             f"{args.requests} requests per seed at {args.rate}/s (Poisson); backend budget "
             f"{args.budget}; deadlines = {DEADLINE_FLOOR_S} s + slack × Q4_K_M's time at the speeds in "
             f"`{calibration.name}` (slack: "
             + ", ".join(f"{p} {s}×" for p, _, s in MIX) + "); quality = measured top-1 agreement with F16.", "",
             "| policy | goodput (quality-weighted met/s), mean [min–max] | × always-q4_K_M, mean [min–max] | "
             + " | ".join(f"met {p}" for p, _, _ in MIX) + " | p50 latency | p95 latency | loads | evictions |",
             "|---|---|---|" + "---|" * len(MIX) + "---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s.policy} | {statistics.fmean(s.goodput):.3f} [{min(s.goodput):.3f}–{max(s.goodput):.3f}] | "
                     f"{statistics.fmean(s.ratio):.2f}× [{min(s.ratio):.2f}–{max(s.ratio):.2f}] | "
                     + " | ".join(f"{s.met.get(p, 0.0):.0%}" for p, _, _ in MIX)
                     + f" | {s.p50:.2f} s | {s.p95:.2f} s | {s.loads} | {s.evictions} |")
    ours = next((s for s in summaries if s.policy == "quantrouter"), None)
    if ours is not None:
        lines += ["", f"quantrouter's goodput is {statistics.fmean(ours.ratio):.2f}× always-q4_K_M's "
                      f"(per seed: {', '.join(f'{r:.2f}×' for r in ours.ratio)})."]
    lines += ["", "Per-request rows: replay.csv. Plot: replay.png."]
    return "\n".join(lines) + "\n"


def plot(summaries: Sequence[Summary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [s.policy for s in summaries]
    means = [statistics.fmean(s.goodput) for s in summaries]
    spread = [[m - min(s.goodput) for m, s in zip(means, summaries, strict=True)],
              [max(s.goodput) - m for m, s in zip(means, summaries, strict=True)]]
    left.bar(names, means, yerr=spread, capsize=4, color="#4c72b0")
    left.set_ylabel("goodput (quality-weighted requests met / s)")
    left.set_title("goodput, mean and min–max over seeds")
    left.tick_params(axis="x", rotation=20)
    width = 0.8 / len(MIX)
    for offset, (preference, _, _) in enumerate(MIX):
        right.bar([i + offset * width for i in range(len(summaries))], [s.met.get(preference, 0.0) for s in summaries],
                  width, label=preference)
    right.set_xticks([i + width for i in range(len(summaries))], names, rotation=20)
    right.set_ylabel("share of requests that met their deadline")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replay", description=__doc__.split("\n\n")[0],
        epilog="The full run (3 seeds × 4 policies) takes about a quarter of an hour here; --quick one seed, "
               "8 requests, a few minutes.")
    parser.add_argument("--seed", type=int, action="append", help=f"a trace seed; repeat for more "
                        f"(default {', '.join(map(str, FULL.seeds))})")
    parser.add_argument("--requests", type=int, help=f"requests per seed (default {FULL.requests})")
    parser.add_argument("--rate", type=float, help=f"arrivals per second (default {FULL.rate})")
    parser.add_argument("--budget", default=DEFAULT_BUDGET, help=f"the backend's memory budget (default "
                        f"{DEFAULT_BUDGET}, below the whole ladder)")
    parser.add_argument("--calibration", type=Path, default=CALIBRATION,
                        help="measured speeds and quality (`quantrouter calibrate --quality --embedded`)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where replay.md, .csv and .png go (default bench/results)")
    parser.add_argument("--quick", action="store_true", help="one seed, 8 requests: a few minutes")
    add_setting_option(parser, "smallest_under_overload=1")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.seed = args.seed or list(preset.seeds)
    args.requests = args.requests or preset.requests
    args.rate = args.rate or preset.rate
    args.setting = settings_of(parser, args)
    return args


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    calibration = read_calibration(args.calibration)
    qualities = {tag: c.quality.top1 for tag, c in calibration.items() if c.quality is not None}
    if PINNED not in calibration:
        raise SystemExit(f"{args.calibration} has no {PINNED}; run `quantrouter calibrate {FAMILY} --quality "
                         "--embedded -o FILE` and pass --calibration FILE")
    budget = parse_bytes(args.budget)
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    spans: dict[int, float] = {}
    counts: dict[tuple[int, str], tuple[int, int]] = {}
    for seed in args.seed:
        trace = make_trace(seed, args.requests, args.rate, calibration[PINNED])
        spans[seed] = trace[-1].at
        for policy in POLICIES:
            ran, counts[(seed, policy)] = run_policy(trace, seed, policy, budget, args.calibration, qualities,
                                                     args.setting)
            outcomes += ran
            met = sum(o.met for o in ran)
            log(f"seed {seed} {policy:<18} {met}/{len(ran)} met, loads {counts[(seed, policy)][0]}, "
                f"evictions {counts[(seed, policy)][1]}")
    summaries = summarise(outcomes, spans, counts)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "replay.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(outcomes[0])))
        writer.writeheader()
        writer.writerows(asdict(o) for o in outcomes)
    report = format_report(summaries, args, args.seed, time.perf_counter() - started, args.calibration)
    (args.out / "replay.md").write_text(report)
    plot(summaries, args.out / "replay.png")
    log(report)


if __name__ == "__main__":
    main()
