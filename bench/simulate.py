"""The policy simulator: quantrouter's `decide` against the usual rules and an oracle, on shared traces.

`python -m bench.simulate [--seeds N] [--out DIR]` writes simulation.md, simulation.csv and one PNG per
scenario. The model behind it is in bench/sim (see its docstrings); the reading of the numbers is in
bench/sim/analysis.md, which the markdown includes.
"""

from __future__ import annotations

import argparse
import datetime
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.machine import describe
from bench.sim.engine import Policy, RunResult, Simulation
from bench.sim.hardware import GB, H100, LLAMA_8B, LLAMA_70B, RTX_4090, FamilySpec, GpuSpec
from bench.sim.policies import POLICIES, hindsight_best
from bench.sim.report import Summary, markdown_table, plot_scenario, relative_to_oracle, summarize, write_csv
from bench.sim.workload import (
    Phase,
    RequestClass,
    TenantProfile,
    generate_requests,
    generate_tenant,
    interactive_mix,
)

RESULTS = Path(__file__).parent / "results"
ANALYSIS = Path(__file__).parent / "sim" / "analysis.md"
DEFAULT_SEEDS = 10
HINDSIGHT = "oracle-hindsight"
# A 70B model decodes ~4× slower than an 8B one on the same GPU (bench/sim/hardware.py): stretch the SLOs.
SLO_SCALE_70B = 4.0
TPS_SCALE_70B = 0.25


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    gpu: GpuSpec
    family: FamilySpec
    classes: tuple[RequestClass, ...]
    phases: tuple[Phase, ...]
    duration: float
    tenant: TenantProfile


# Desktop or CUDA-context use by other processes: 1–3 GB. Memory pressure: another tenant at 40–76 GB of 80.
QUIET_TENANT = TenantProfile(1 * int(GB), 3 * int(GB), (60.0, 180.0))
PRESSURE_TENANT = TenantProfile(40 * int(GB), 76 * int(GB), (30.0, 90.0))

SCENARIOS = (
    Scenario("h100-8b", "H100 80 GB, Llama-3.1-8B ladder, 0.25 req/s", H100, LLAMA_8B, interactive_mix(1, 1),
             (Phase(0, 0.25),), 900.0, QUIET_TENANT),
    Scenario("rtx4090-8b", "RTX 4090 24 GB, Llama-3.1-8B ladder, 0.2 req/s", RTX_4090, LLAMA_8B,
             interactive_mix(1, 1), (Phase(0, 0.2),), 900.0, QUIET_TENANT),
    Scenario("h100-70b", "H100 80 GB, Llama-3.1-70B ladder, 0.05 req/s, SLOs ×4", H100, LLAMA_70B,
             interactive_mix(SLO_SCALE_70B, TPS_SCALE_70B), (Phase(0, 0.05),), 1800.0, QUIET_TENANT),
    Scenario("shared-pressure", "H100 80 GB shared: other tenants hold 40–76 GB, 8B ladder, 0.25 req/s", H100,
             LLAMA_8B, interactive_mix(1, 1), (Phase(0, 0.25),), 900.0, PRESSURE_TENANT),
    Scenario("burst", "H100 80 GB, 8B ladder: 0.15 req/s with a 60 s burst at 2 req/s", H100, LLAMA_8B,
             interactive_mix(1, 1), (Phase(0, 0.15), Phase(300, 2.0), Phase(360, 0.15)), 900.0, QUIET_TENANT),
)


def run_scenario(scenario: Scenario, seeds: int, policies: Sequence[Policy] = POLICIES,
                 ) -> tuple[list[Summary], dict[str, list[RunResult]]]:
    """Every policy, and the hindsight oracle, on the same `seeds` traces; summaries and raw runs by policy name."""
    runs: dict[str, list[RunResult]] = {p.name: [] for p in policies}
    runs[HINDSIGHT] = []
    for seed in range(seeds):
        rng = random.Random(f"{scenario.name}/{seed}")
        requests = generate_requests(scenario.classes, scenario.phases, scenario.duration, rng)
        tenant = generate_tenant(scenario.tenant, scenario.duration, rng)
        for policy in policies:
            runs[policy.name].append(Simulation(scenario.gpu, scenario.family, requests, tenant, policy).run())
        runs[HINDSIGHT].append(hindsight_best(scenario.gpu, scenario.family, requests, tenant))
    summaries = [summarize(scenario.name, name, result, scenario.duration) for name, result in runs.items()]
    return relative_to_oracle(summaries), runs


def _headline(by_scenario: Sequence[Sequence[Summary]]) -> str:
    """quantrouter's goodput as a ratio to the better oracle and to each baseline, one row per scenario."""
    rivals = [s.policy for s in by_scenario[0] if not s.policy.startswith(("quantrouter", "oracle"))]
    rows = ["| scenario | vs best oracle | " + " | ".join(f"vs {r}" for r in rivals) + " |",
            "|---|---|" + "---|" * len(rivals)]
    for summaries in by_scenario:
        by_name = {s.policy: s for s in summaries}
        ours = by_name["quantrouter"]
        ratios = [ours.goodput_qw_tok_s / by_name[r].goodput_qw_tok_s for r in rivals]
        rows.append(f"| {ours.scenario} | {ours.goodput_vs_oracle:.2f} | "
                    + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    return "\n".join(rows)


def _losses(summaries: Sequence[Summary]) -> list[str]:
    ours = next(s for s in summaries if s.policy == "quantrouter")
    return [f"- loses to **{s.policy}** on goodput: {s.goodput_qw_tok_s:.1f} vs {ours.goodput_qw_tok_s:.1f} q·tok/s "
            f"(SLO met {s.slo_attainment:.1%} vs {ours.slo_attainment:.1%})"
            for s in summaries
            if not s.policy.startswith(("quantrouter", "oracle")) and s.goodput_qw_tok_s > ours.goodput_qw_tok_s]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__)
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="traces per scenario")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sections, everything, by_scenario = [], [], []
    for scenario in SCENARIOS:
        summaries, runs = run_scenario(scenario, args.seeds)
        everything.extend(summaries)
        by_scenario.append(summaries)
        quant_names = [v.quant.name for v in sorted(scenario.family.variants, key=lambda v: v.size_bytes)]
        plot_scenario(args.out / f"simulation-{scenario.name}.png", scenario.title, summaries,
                      runs["quantrouter"][0], "quantrouter", quant_names, scenario.duration)
        losses = _losses(summaries) or ["- quantrouter is ahead of every baseline on goodput."]
        sections.append(f"### {scenario.name}: {scenario.title}\n\n![{scenario.name}](simulation-{scenario.name}.png)"
                        f"\n\n{markdown_table(summaries)}\n\n" + "\n".join(losses))
        print(f"{scenario.name}: done", flush=True)
    elapsed = time.perf_counter() - started
    write_csv(args.out / "simulation.csv", everything)
    header = (f"# Policy simulation\n\nGenerated by `python -m bench.simulate --seeds {args.seeds}` on "
              f"{datetime.date.today().isoformat()}, {describe()}; {elapsed:.0f} s. Each scenario replays the same "
              f"{args.seeds} traces (seeded) under every policy. Goodput counts only requests that met their SLO "
              "(finished before the deadline, decoded at least at min tok/s), weighted by the variant's quality prior "
              "(top-token agreement with F16, `quantrouter.quant`). Latency percentiles are over completed requests. "
              "Raw figures: [simulation.csv](simulation.csv).\n")
    analysis = ANALYSIS.read_text() if ANALYSIS.exists() else ""
    headline = ("## quantrouter's goodput relative to the others\n\nRatio of quality-weighted goodput "
                "(above 1: quantrouter ahead).\n\n" + _headline(by_scenario) + "\n")
    (args.out / "simulation.md").write_text(header + "\n" + headline + "\n" + analysis + "\n## Results\n\n"
                                            + "\n\n".join(sections) + "\n")
    print(f"wrote {args.out}/simulation.md in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
