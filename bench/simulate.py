"""The policy simulator: quantrouter's `decide` against the usual rules and two oracles, on shared traces.

`python -m bench.simulate [--seeds N] [--workers N] [--out DIR]` runs every scenario under every engine
variant (bench/sim/hardware.py ENGINES) for N seeded traces, and writes simulation.md, simulation.csv and
one PNG per scenario (default engine). The model behind it is in bench/sim (see its docstrings); every
sentence of the reading in simulation.md is generated from the figures of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench.machine import describe
from bench.readme import replace_block
from bench.router_settings import add_setting_option, policy_with, settings_of
from bench.sim.engine import NUM_CTX, Policy, RunResult, Simulation
from bench.sim.hardware import (
    DEFAULT_ENGINE,
    ENGINES,
    GB,
    H100,
    LLAMA_8B,
    LLAMA_70B,
    RTX_4090,
    EngineSpec,
    FamilySpec,
    GpuSpec,
)
from bench.sim.policies import hindsight_best, policies_for
from bench.sim.report import (
    HINDSIGHT,
    OURS,
    REFERENCE,
    Cell,
    RunFigures,
    acceptance,
    cell_of,
    figures_of,
    markdown_cells,
    markdown_preferences,
    plot_scenario,
    reading,
    summary,
    write_csv,
)
from bench.sim.workload import (
    Phase,
    Request,
    RequestClass,
    TenantProfile,
    generate_requests,
    generate_tenant,
    interactive_mix,
    with_squeeze,
)
from quantrouter.policy import PolicyConfig
from quantrouter.values import Preference

RESULTS = Path(__file__).parent / "results"
DEFAULT_SEEDS = 20
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
    num_ctx: int = NUM_CTX
    squeeze: tuple[float, float, int] | None = None  # (start s, end s, bytes another tenant holds meanwhile)

    def trace(self, seed: int) -> tuple[tuple[Request, ...], tuple[tuple[float, int], ...]]:
        rng = random.Random(f"{self.name}/{seed}")
        requests = generate_requests(self.classes, self.phases, self.duration, rng)
        tenant = generate_tenant(self.tenant, self.duration, rng)
        if self.squeeze is not None:
            tenant = with_squeeze(tenant, *self.squeeze)
        return requests, tenant


# Desktop or CUDA-context use by other processes: 1–3 GB. Memory pressure: another tenant at 40–76 GB of 80.
QUIET_TENANT = TenantProfile(1 * int(GB), 3 * int(GB), (60.0, 180.0))
PRESSURE_TENANT = TenantProfile(40 * int(GB), 76 * int(GB), (30.0, 90.0))
# A squeeze on the H100: another job holds 73.5 GB for the first 10 minutes, leaving ~6.5 GB: below what
# Q4_K_M's prediction needs within Ollama's threshold (6.0 GB / 0.8), above Q2_K's (4.3 GB / 0.8).
SQUEEZE = (0.0, 600.0, int(73.5 * GB))
# Hard constraints: half of the QUALITY callers (here 40 % of the traffic) require min_quantization Q8_0.
CONSTRAINED_MIX = (
    RequestClass(Preference.LATENCY, 0.3, (100, 800), (32, 200), 4.0, 60.0),
    RequestClass(Preference.BALANCED, 0.3, (200, 2000), (100, 400), 10.0, 30.0),
    RequestClass(Preference.QUALITY, 0.2, (500, 4000), (200, 800), 30.0, 0.0),
    RequestClass(Preference.QUALITY, 0.2, (500, 4000), (200, 800), 30.0, 0.0, min_quantization="Q8_0"),
)
# Long prompts at num_ctx 32k (RAG-style): 8–24k prompt tokens, answers as in the interactive mix.
LONG_PROMPT_MIX = tuple(replace(c, prompt_tokens=(8000, 24000), deadline_s=c.deadline_s * 2)
                        for c in interactive_mix(1, 1))

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
    Scenario("idle", "H100 80 GB, 8B ladder, 0.03 req/s: everything fits and the GPU is mostly idle", H100,
             LLAMA_8B, interactive_mix(1, 1), (Phase(0, 0.03),), 1800.0, QUIET_TENANT),
    Scenario("squeeze", "H100 80 GB, 8B ladder, 0.2 req/s; another job holds 73.5 GB for the first 600 s", H100,
             LLAMA_8B, interactive_mix(1, 1), (Phase(0, 0.2),), 900.0, QUIET_TENANT, squeeze=SQUEEZE),
    Scenario("constraints", "H100 80 GB, 8B ladder, 0.2 req/s; half the QUALITY callers require Q8_0", H100,
             LLAMA_8B, CONSTRAINED_MIX, (Phase(0, 0.2),), 900.0, QUIET_TENANT),
    Scenario("long-prompts", "RTX 4090 24 GB, 8B ladder, 0.1 req/s, 8–24k-token prompts at num_ctx 32k",
             RTX_4090, LLAMA_8B, LONG_PROMPT_MIX, (Phase(0, 0.1),), 900.0, QUIET_TENANT, num_ctx=32768),
)


def run_unit(unit: tuple[int, int, int, PolicyConfig]) -> dict[str, RunFigures]:
    """Every policy and the hindsight oracle on one (scenario, engine, seed) trace, quantrouter deciding by the
    given knobs: compact figures by policy."""
    scenario, engine, seed = SCENARIOS[unit[0]], ENGINES[unit[1]], unit[2]
    requests, tenant = scenario.trace(seed)
    out = {}
    for policy in policies_for(engine, unit[3]):
        result = Simulation(scenario.gpu, scenario.family, requests, tenant, policy, engine=engine,
                            num_ctx=scenario.num_ctx).run()
        out[policy.name] = figures_of(result)
    out[HINDSIGHT] = figures_of(hindsight_best(scenario.gpu, scenario.family, requests, tenant, engine,
                                               scenario.num_ctx))
    return out


def timeline(scenario: Scenario, policy: Policy, engine: EngineSpec = DEFAULT_ENGINE) -> RunResult:
    """Seed 0 of `scenario` under `policy`, for the plot's time panel."""
    requests, tenant = scenario.trace(0)
    return Simulation(scenario.gpu, scenario.family, requests, tenant, policy, engine=engine,
                      num_ctx=scenario.num_ctx).run()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__)
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="traces per scenario and engine")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--scenarios", nargs="*", default=None, help="only these scenarios (default: all)")
    parser.add_argument("--engines", nargs="*", default=None, help="only these engine variants (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    add_setting_option(parser, "tight_arrivals=0.2")
    args = parser.parse_args(argv)
    settings = settings_of(parser, args)
    config = policy_with(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    scenarios = [i for i, s in enumerate(SCENARIOS) if args.scenarios is None or s.name in args.scenarios]
    engines = [i for i, e in enumerate(ENGINES) if args.engines is None or e.name in args.engines]
    units = [(s, e, seed, config) for s in scenarios for e in engines for seed in range(args.seeds)]
    started = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        figures = []
        for i, result in enumerate(pool.imap(run_unit, units, chunksize=4), 1):
            figures.append(result)
            if i % max(len(units) // 20, 1) == 0 or i == len(units):
                print(f"\r{i}/{len(units)} traces ({time.perf_counter() - started:.0f} s)", end="", flush=True)
    print()
    cells: list[Cell] = []
    for s in scenarios:
        for e in engines:
            runs = [f for (us, ue, _, _), f in zip(units, figures, strict=True) if (us, ue) == (s, e)]
            cells.append(cell_of(SCENARIOS[s].name, ENGINES[e].name, SCENARIOS[s].duration, runs))
    elapsed = time.perf_counter() - started
    for s in scenarios:
        scenario = SCENARIOS[s]
        quant_names = [v.quant.name for v in sorted(scenario.family.variants, key=lambda v: v.size_bytes)]
        default = next(c for c in cells if c.scenario == scenario.name and c.engine == DEFAULT_ENGINE.name)
        plot_scenario(args.out / f"simulation-{scenario.name}.png", scenario.title, default,
                      timeline(scenario, policies_for(DEFAULT_ENGINE, config)[0]), OURS, quant_names, scenario.duration)
    write_csv(args.out / "simulation.csv", cells)
    command = "python -m bench.simulate" + (f" --seeds {args.seeds}" if args.seeds != DEFAULT_SEEDS else "") + "".join(
        f" --setting {name}={value}" for name, value in settings.items())
    header = (f"# Policy simulation\n\nGenerated by `{command}` on {datetime.date.today().isoformat()}, "
              f"{describe()}; {len(units)} traces ({args.seeds} seeds × {len(scenarios)} scenarios × "
              f"{len(engines)} engine variants) in {elapsed:.0f} s with {args.workers} worker processes. Every "
              "policy replays the same traces. Goodput counts only requests that met their SLO (finished before the "
              "deadline, decoded at least at min tok/s, and honoured min_quantization), weighted by the variant's "
              "quality; a ratio is of goodputs summed over the seeds, with a 95 % bootstrap interval over seeds. The "
              "hindsight oracle (the best fixed variant per preference for each trace, 22 replays) runs on every "
              "engine variant. Latency "
              "percentiles are over completed requests. Raw figures: [simulation.csv](simulation.csv). "
              "Neither oracle is an upper bound: tests/unit/test_simulator.py checks every policy and both "
              "oracles against an exhaustive optimum (every assignment of a variant or a refusal to every "
              "request) on tiny traces.\n")
    families = {SCENARIOS[s].family.name: SCENARIOS[s].family.quality_source for s in scenarios}
    weights = "\n".join(f"- {name}: {source}" for name, source in families.items())
    text = (header + "\n## Reading\n\n" + reading(cells) + "\n\n## Acceptance (issue 10)\n\n" + acceptance(cells)
            + f"\n\n## quantrouter vs {REFERENCE}, every scenario × engine variant\n\n" + markdown_cells(cells)
            + "\n\n## Per preference class (default engine)\n\n"
            + markdown_preferences([c for c in cells if c.engine == DEFAULT_ENGINE.name])
            + "\n\n## Quality weight of goodput\n\nNo simulated family has a calibration file, so the weight is the "
            "quant prior (`quantrouter.quant`), perturbed where stated:\n\n" + weights
            + "\n\n## Scenarios (default engine)\n\n"
            + "\n\n".join(f"### {SCENARIOS[s].name}: {SCENARIOS[s].title}\n\n"
                          f"![{SCENARIOS[s].name}](simulation-{SCENARIOS[s].name}.png)" for s in scenarios) + "\n")
    (args.out / "simulation.md").write_text(text)
    if (args.out, args.seeds, len(scenarios), len(engines), settings) == (RESULTS, DEFAULT_SEEDS, len(SCENARIOS),
                                                                          len(ENGINES), {}):
        replace_block("simulation", f"{summary(cells, DEFAULT_ENGINE.name)} (Run of {datetime.date.today()}.)")
    print(f"wrote {args.out}/simulation.md in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
