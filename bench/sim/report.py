"""Figures from simulation runs, and the markdown, CSV and PNG that carry them.

Every sentence of the reading is generated from the figures it states, so it cannot go stale.
"""

from __future__ import annotations

import csv
import math
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.sim.engine import Outcome, RunResult
from bench.sim.hardware import DEFAULT_ENGINE
from bench.stats import percentile
from quantrouter.values import Preference

GB = 1e9
ORACLE_PREFIX = "oracle"
OURS = "quantrouter"
REFERENCE = "always-q4_K_M"
HINDSIGHT = "oracle-hindsight"
BOOTSTRAP_RESAMPLES = 2000
# Issue 10's acceptance: mean ratio, lower end of its interval, vs the best oracle; idle; squeeze and constraints.
TARGET_RATIO, TARGET_LOW, TARGET_ORACLE = 1.00, 0.98, 0.95
TARGET_SPECIAL = {"idle": 1.06, "squeeze": 1.25, "constraints": 1.25}
SLO_SLACK = 0.01


@dataclass(frozen=True, slots=True)
class Record:
    preference: str
    slo_met: bool
    completed: bool
    quality: float
    latency: float
    quant: str | None


@dataclass(frozen=True, slots=True)
class RunFigures:
    """What a report needs of one run (small enough to cross a process boundary)."""

    goodput: float
    loads: int
    evicting_loads: int
    partial_loads: int
    records: tuple[Record, ...]
    # Every request's output tokens: the goodput of a run where each met its SLO at quality 1 (F16's agreement with
    # itself; no quality weight exceeds it), which no policy can pass on this trace.
    tokens: int


def figures_of(run: RunResult) -> RunFigures:
    records = tuple(Record(r.request.preference.value, r.slo_met, r.outcome is Outcome.COMPLETED, r.quality,
                           r.latency, r.tag.rsplit("-", 1)[-1] if r.tag else None) for r in run.results)
    return RunFigures(sum(r.quality * r.request.output_tokens for r in run.results if r.slo_met), run.loads,
                      run.evicting_loads, run.partial_loads, records,
                      sum(r.request.output_tokens for r in run.results))


@dataclass(frozen=True, slots=True)
class ClassFigures:
    slo_met: float
    mean_quality: float
    p95_latency: float


@dataclass(frozen=True, slots=True)
class PolicyFigures:
    """One policy on one scenario and engine, pooled over seeds."""

    goodput: float  # quality-weighted tok/s
    per_seed: tuple[float, ...]
    slo_met: float
    failed: int
    cold_loads: int
    evicting_loads: int
    partial_loads: int
    p50_latency: float
    p95_latency: float
    mean_quality: float
    picks: str
    classes: dict[str, ClassFigures]


@dataclass(frozen=True, slots=True)
class Interval:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True, slots=True)
class Cell:
    """One scenario under one engine variant: every policy's figures and quantrouter's ratios."""

    scenario: str
    engine: str
    seeds: int
    policies: dict[str, PolicyFigures]
    vs_reference: Interval
    vs_oracle: Interval
    # The most any policy could reach against the reference (`RunFigures.tokens` over its goodput, seeds pooled as
    # `vs_reference` pools them): a bound, where the oracles are only policies.
    ceiling: float


def bootstrap_ratio(ours: Sequence[float], theirs: Sequence[float], seed: str) -> Interval:
    """Σ ours / Σ theirs over the seeds (the ratio of mean goodputs), with a 95 % percentile-bootstrap interval
    from resampling seeds. A ratio of sums, not a mean of per-trace ratios, so that a trace where the reference
    serves almost nothing does not dominate."""
    def ratio(indices: Sequence[int]) -> float:
        total = sum(theirs[i] for i in indices)
        return sum(ours[i] for i in indices) / total if total > 0 else float("nan")

    rng = random.Random(seed)
    n = len(ours)
    ratios = sorted(ratio(rng.choices(range(n), k=n)) for _ in range(BOOTSTRAP_RESAMPLES))
    return Interval(ratio(range(n)), ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1])


def _class_figures(records: Sequence[Record]) -> ClassFigures:
    done = [r for r in records if r.completed]
    return ClassFigures(sum(r.slo_met for r in records) / max(len(records), 1),
                        statistics.fmean(r.quality for r in done) if done else 0.0,
                        percentile([r.latency for r in done], 0.95))


def _policy_figures(runs: Sequence[RunFigures], duration: float) -> PolicyFigures:
    records = [r for run in runs for r in run.records]
    done = [r for r in records if r.completed]
    picks = Counter(r.quant for r in records if r.quant)
    total = sum(picks.values()) or 1
    return PolicyFigures(
        sum(run.goodput for run in runs) / (duration * len(runs)), tuple(run.goodput for run in runs),
        sum(r.slo_met for r in records) / max(len(records), 1), sum(not r.slo_met for r in records),
        sum(run.loads for run in runs), sum(run.evicting_loads for run in runs), sum(run.partial_loads for run in runs),
        percentile([r.latency for r in done], 0.50), percentile([r.latency for r in done], 0.95),
        statistics.fmean(r.quality for r in done) if done else 0.0,
        " ".join(f"{q}:{n / total:.0%}" for q, n in picks.most_common(3)),
        {p.value: _class_figures([r for r in records if r.preference == p.value]) for p in Preference},
    )


def cell_of(scenario: str, engine: str, duration: float, runs: Sequence[dict[str, RunFigures]],
            ours_name: str = OURS, reference: str = REFERENCE) -> Cell:
    names = list(runs[0])
    policies = {name: _policy_figures([run[name] for run in runs], duration) for name in names}
    ours = policies[ours_name].per_seed
    oracles = [max(run[n].goodput for n in names if n.startswith(ORACLE_PREFIX)) for run in runs]
    key = f"{scenario}/{engine}"
    reference_goodput = sum(policies[reference].per_seed)
    ceiling = sum(run[reference].tokens for run in runs) / reference_goodput if reference_goodput else math.inf
    return Cell(scenario, engine, len(runs), policies, bootstrap_ratio(ours, policies[reference].per_seed, key),
                bootstrap_ratio(ours, oracles, key + "/oracle"), ceiling)


def short_of(value: float, digits: int = 3) -> str:
    """`value` rounded down at `digits` decimals: a figure listed as missing a ≥ bar never reads as meeting it
    (0.9996 below 1.00× prints 0.999, not 1.000; a gap of −1.04 pt prints −1.1, not −1.0)."""
    scale = 10 ** digits
    return f"{math.floor(value * scale + 1e-9) / scale:.{digits}f}"


def _verdicts(cell: Cell) -> list[tuple[str, bool, str]]:
    """(what was checked, whether it held, the figure) for issue 10's targets on one cell."""
    ratio, oracle = cell.vs_reference, cell.vs_oracle
    out = [(f"mean ≥ {TARGET_RATIO:.2f}× {REFERENCE}", ratio.mean >= TARGET_RATIO, short_of(ratio.mean)),
           (f"95 % interval low ≥ {TARGET_LOW:.2f}", ratio.low >= TARGET_LOW, short_of(ratio.low)),
           (f"≥ {TARGET_ORACLE:.2f}× the best oracle", oracle.mean >= TARGET_ORACLE, short_of(oracle.mean))]
    special = TARGET_SPECIAL.get(cell.scenario)
    if special is not None:
        out.append((f"{cell.scenario} ≥ {special:.2f}×", ratio.mean >= special, short_of(ratio.mean)))
    for p in Preference:
        gap = _class_gap(cell, OURS, p)
        figure = f"{_points(gap)} pt, hindsight oracle {_points(_class_gap(cell, HINDSIGHT, p))} pt"
        out.append((f"{p.value} SLO met ≥ {REFERENCE}'s − 1 pt", gap >= -SLO_SLACK, figure))
    return out


def _class_gap(cell: Cell, policy: str, preference: Preference) -> float:
    """`policy`'s SLO met for one preference class minus the reference's, as a fraction."""
    return (cell.policies[policy].classes[preference.value].slo_met
            - cell.policies[REFERENCE].classes[preference.value].slo_met)


def _points(gap: float) -> str:
    return f"{'+' if gap >= 0 else ''}{short_of(gap * 100, 1)}"


def summary(cells: Sequence[Cell], engine: str) -> str:
    """The run in a few sentences for the README: checks held, each scenario's ratio on `engine`, where it
    loses, and how each preference class fares against the reference's SLO."""
    verdicts = [(what, held) for c in cells for what, held, _ in _verdicts(c)]
    ratios = "; ".join(f"{c.scenario} {c.vs_reference}" for c in cells if c.engine == engine)
    lost = [f"{c.scenario}/{c.engine} {short_of(c.vs_reference.mean)}" for c in cells
            if c.vs_reference.mean < TARGET_RATIO]
    classes = []
    for p in Preference:
        gaps = sorted(c.policies[OURS].classes[p.value].slo_met - c.policies[REFERENCE].classes[p.value].slo_met
                      for c in cells)
        within = sum(gap >= -SLO_SLACK for gap in gaps)
        classes.append(f"{p.value} in {within} of {len(gaps)} cells (median {percentile(gaps, 0.5) * 100:+.1f} pt)")
    return (f"{sum(held for _, held in verdicts)} of {len(verdicts)} acceptance checks hold over {len(cells)} "
            f"scenario × engine cells. quantrouter's goodput ÷ {REFERENCE}'s on the {engine} engine, mean [95 % "
            f"interval]: {ratios}. Below {TARGET_RATIO:.2f}× in {len(lost)} of {len(cells)} cells"
            f"{': ' + ', '.join(lost) if lost else ''}. SLO met within a point of {REFERENCE}'s: "
            f"{'; '.join(classes)}.")


def markdown_cells(cells: Sequence[Cell]) -> str:
    rows = [f"| scenario | engine | vs {REFERENCE} (mean [95 % CI]) | vs best oracle | quantrouter SLO met "
            f"| {REFERENCE} SLO met | quantrouter picks | targets missed |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        missed = [what for what, held, _ in _verdicts(c) if not held]
        rows.append(f"| {c.scenario} | {c.engine} | {c.vs_reference} | {c.vs_oracle.mean:.3f} "
                    f"| {c.policies[OURS].slo_met:.1%} | {c.policies[REFERENCE].slo_met:.1%} "
                    f"| {c.policies[OURS].picks} | {'; '.join(missed) or 'none'} |")
    return "\n".join(rows)


def markdown_preferences(cells: Sequence[Cell]) -> str:
    rows = ["| scenario | policy | " + " | ".join(f"{p.value} SLO met | {p.value} quality | {p.value} p95 s"
                                                  for p in Preference) + " |",
            "|---|---|" + "---|" * (3 * len(Preference))]
    for c in cells:
        for name, figures in c.policies.items():
            cols = " | ".join(f"{figures.classes[p.value].slo_met:.1%} | {figures.classes[p.value].mean_quality:.3f} "
                              f"| {figures.classes[p.value].p95_latency:.2f}" for p in Preference)
            rows.append(f"| {c.scenario} | {name} | {cols} |")
    return "\n".join(rows)


def acceptance(cells: Sequence[Cell]) -> str:
    """Each target: in how many cells it holds, and the cells where it does not, with their figure."""
    checks: dict[str, list[tuple[Cell, bool, str]]] = {}
    for c in cells:
        for what, held, figure in _verdicts(c):
            checks.setdefault(what, []).append((c, held, figure))
    held_total = sum(held for results in checks.values() for _, held, _ in results)
    total = sum(len(results) for results in checks.values())
    rows = [f"{held_total} of {total} checks hold over {len(cells)} scenario × engine cells.", "",
            "| target | holds in | where it does not (figure; the best oracle's ratio to the reference there) |",
            "|---|---|---|"]
    for what, results in checks.items():
        failed = [f"{c.scenario}/{c.engine} ({figure}; {_oracle_headroom(c):.3f})" for c, held, figure in results
                  if not held]
        rows.append(f"| {what} | {len(results) - len(failed)} of {len(results)} | {', '.join(failed) or '—'} |")
    return "\n".join(rows)


def _oracle_headroom(cell: Cell) -> float:
    """How far above the reference the better oracle gets: the room any policy had in this cell."""
    best = max(f.goodput for n, f in cell.policies.items() if n.startswith(ORACLE_PREFIX))
    ref = cell.policies[REFERENCE].goodput
    return best / ref if ref else float("nan")


def _special_misses(cells: Sequence[Cell]) -> list[str]:
    """For each scenario target missed under some engine: how much of the scenario's trouble the reference
    still meets there, against the default engine (an engine can take away what the scenario was built on), and
    whether any policy could reach the target at all (`Cell.ceiling`)."""
    lines = []
    for c in cells:
        target = TARGET_SPECIAL.get(c.scenario)
        base = next((d for d in cells if d.scenario == c.scenario and d.engine == DEFAULT_ENGINE.name), None)
        if target is None or c.vs_reference.mean >= target or base is None or base is c:
            continue
        line = (f"{c.scenario} / {c.engine} misses its {target:g}× target ({short_of(c.vs_reference.mean)}): "
                f"there {REFERENCE} itself meets {c.policies[REFERENCE].slo_met:.1%} of SLOs, against "
                f"{base.policies[REFERENCE].slo_met:.1%} on the default engine, which leaves less to win")
        if c.ceiling < target:
            line += (f"; no policy can reach it there: with every request meeting its SLO at quality 1, goodput "
                     f"would be {short_of(c.ceiling)}× {REFERENCE}'s")
        lines.append(line + ".")
    return lines


def reading(cells: Sequence[Cell]) -> str:
    """A few sentences, each computed from the cells."""
    ratios = [c.vs_reference.mean for c in cells]
    worst = min(cells, key=lambda c: c.vs_reference.mean)
    best = max(cells, key=lambda c: c.vs_reference.mean)
    ahead = sum(c.vs_reference.low > 1.0 for c in cells)
    behind = [c for c in cells if c.vs_reference.high < 1.0]
    oracle = min(cells, key=lambda c: c.vs_oracle.mean)
    lines = [
        f"Across {len(cells)} scenario × engine cells quantrouter's goodput is {min(ratios):.3f}–{max(ratios):.3f}× "
        f"{REFERENCE}'s (median {statistics.median(ratios):.3f}); in {ahead} cells the whole 95 % interval lies "
        f"above 1, in {len(behind)} wholly below.",
        f"Its best cell is {best.scenario} / {best.engine} ({best.vs_reference}); its worst {worst.scenario} / "
        f"{worst.engine} ({worst.vs_reference}), where the better oracle reaches {_oracle_headroom(worst):.3f}× "
        f"{REFERENCE}.",
        f"Against the better of the two oracles it reaches {min(c.vs_oracle.mean for c in cells):.3f}–"
        f"{max(c.vs_oracle.mean for c in cells):.3f}× (lowest: {oracle.scenario} / {oracle.engine}).",
    ]
    if behind:
        lines.append("Cells it loses outright: " + ", ".join(
            f"{c.scenario} / {c.engine} ({short_of(c.vs_reference.mean)})" for c in behind) + ".")
    no_room = [c for c in cells if _oracle_headroom(c) < TARGET_RATIO + 0.01]
    if no_room:
        lines.append(f"In {len(no_room)} cells the better oracle that ran gets no more than 1 % above {REFERENCE}: "
                     + ", ".join(f"{c.scenario} / {c.engine} ({_oracle_headroom(c):.3f})" for c in no_room) + ".")
    lines.extend(_special_misses(cells))
    misses = [(c, p) for c in cells for p in Preference if _class_gap(c, OURS, p) < -SLO_SLACK]
    if misses:
        def named(c: Cell, p: Preference) -> str:
            return (f"{c.scenario}/{c.engine} {p.value} ({_points(_class_gap(c, OURS, p))} pt; hindsight oracle "
                    f"{_points(_class_gap(c, HINDSIGHT, p))} pt)")

        traded = [named(c, p) for c, p in misses if _class_gap(c, OURS, p) >= _class_gap(c, HINDSIGHT, p)]
        kept = [named(c, p) for c, p in misses if _class_gap(c, OURS, p) < _class_gap(c, HINDSIGHT, p)]
        sentence = (f"Class SLO misses in the cells where the hindsight oracle (the best fixed variant per "
                    f"preference for each trace, chosen knowing it) also runs: {len(misses)}.")
        if traded:
            sentence += (f" In {len(traded)} of them the oracle gives up as much of that class or more for its "
                         "goodput: " + ", ".join(traded) + ".")
        if kept:
            sentence += (f" In {len(kept)} it gives up less, so the miss is the policy's own: "
                         + ", ".join(kept) + ".")
        lines.append(sentence)
    ours = [c.policies[OURS] for c in cells]
    ref = [c.policies[REFERENCE] for c in cells]
    for p in Preference:
        gaps = [a.classes[p.value].slo_met - b.classes[p.value].slo_met for a, b in zip(ours, ref, strict=True)]
        lines.append(f"{p.value.capitalize()} requests meet their SLO {min(gaps) * 100:+.1f} to "
                     f"{max(gaps) * 100:+.1f} points vs {REFERENCE} (median {statistics.median(gaps) * 100:+.1f}), "
                     f"at mean quality {statistics.median(a.classes[p.value].mean_quality for a in ours):.3f} "
                     f"vs {statistics.median(b.classes[p.value].mean_quality for b in ref):.3f} (medians).")
    return " ".join(lines)


def write_csv(path: Path, cells: Sequence[Cell]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["scenario", "engine", "policy", "seeds", "goodput_qw_tok_s", "ratio_vs_reference",
                         "ratio_low", "ratio_high", "ratio_vs_best_oracle", "slo_met", "failed", "cold_loads",
                         "evicting_loads", "partial_offload_loads", "p50_latency_s", "p95_latency_s", "mean_quality",
                         "picks", *(f"{p.value}_{k}" for p in Preference for k in ("slo_met", "quality", "p95_s"))])
        for c in cells:
            for name, f in c.policies.items():
                ours = name == OURS
                writer.writerow([
                    c.scenario, c.engine, name, c.seeds, f"{f.goodput:.4g}",
                    *((f"{c.vs_reference.mean:.4g}", f"{c.vs_reference.low:.4g}", f"{c.vs_reference.high:.4g}",
                       f"{c.vs_oracle.mean:.4g}") if ours else ("", "", "", "")),
                    f"{f.slo_met:.4g}", f.failed, f.cold_loads, f.evicting_loads, f.partial_loads,
                    f"{f.p50_latency:.4g}", f"{f.p95_latency:.4g}", f"{f.mean_quality:.4g}", f.picks,
                    *(f"{v:.4g}" for p in Preference for v in (f.classes[p.value].slo_met,
                                                               f.classes[p.value].mean_quality,
                                                               f.classes[p.value].p95_latency))])


def plot_scenario(path: Path, title: str, cell: Cell, timeline: RunResult, timeline_policy: str,
                  quant_names: Sequence[str], duration: float) -> None:
    """Three panels: goodput per policy, latency, and one quantrouter run over time."""
    fig, (ax_goodput, ax_latency, ax_time) = plt.subplots(1, 3, figsize=(17, 5.2),
                                                          gridspec_kw={"width_ratios": [1.2, 1, 1.5]})
    names = list(cell.policies)
    figures = [cell.policies[n] for n in names]
    y = range(len(names))
    colors = ["tab:blue" if n.startswith(OURS) else "tab:green" if n.startswith(ORACLE_PREFIX)
              else "tab:gray" for n in names]
    ax_goodput.barh(list(y), [f.goodput for f in figures], color=colors)
    for i, f in enumerate(figures):
        ax_goodput.text(f.goodput, i, f" SLO {f.slo_met:.0%}", va="center", fontsize=8)
    ax_goodput.set_yticks(list(y), names)
    ax_goodput.invert_yaxis()
    ax_goodput.set_xlabel("quality-weighted goodput (tok/s)")
    ax_goodput.set_xlim(0, max(f.goodput for f in figures) * 1.4 or 1.0)
    ax_goodput.set_title(f"goodput, {cell.seeds} seeds (higher is better)")

    width = 0.4
    ax_latency.barh([i - width / 2 for i in y], [f.p50_latency for f in figures], width, label="p50")
    ax_latency.barh([i + width / 2 for i in y], [f.p95_latency for f in figures], width, label="p95")
    ax_latency.set_yticks(list(y), names)
    ax_latency.invert_yaxis()
    ax_latency.set_xlabel("end-to-end latency of completed requests (s)")
    ax_latency.set_title("latency (lower is better)")
    ax_latency.legend(loc="lower right")

    rank = {name.lower(): i for i, name in enumerate(quant_names)}
    style = {True: ("tab:green", "SLO met"), False: ("tab:red", "SLO missed")}
    for met, (color, label) in style.items():
        points = [(r.request.arrival, rank[r.tag.rsplit("-", 1)[-1]]) for r in timeline.results
                  if r.tag and r.slo_met is met]
        if points:
            ax_time.scatter(*zip(*points, strict=True), s=9, color=color, label=label)
    rejected = [r.request.arrival for r in timeline.results if r.tag is None]
    if rejected:
        ax_time.scatter(rejected, [-0.7] * len(rejected), s=9, marker="x", color="black", label="rejected")
    ax_time.set_yticks(range(len(quant_names)), quant_names)
    ax_time.set_ylim(-1.2, len(quant_names) - 0.5)
    ax_time.set_xlabel("time (s)")
    ax_time.set_title(f"{timeline_policy}, seed 0: variant per request")
    ax_time.legend(loc="lower left", fontsize=8)
    ax_time.set_xlim(0, duration)
    memory = ax_time.twinx()
    times = [m.time for m in timeline.memory]
    memory.plot(times, [m.tenant_bytes / GB for m in timeline.memory], color="tab:orange", lw=1,
                label="other tenants")
    memory.plot(times, [(m.tenant_bytes + m.runner_bytes) / GB for m in timeline.memory], color="tab:purple",
                lw=1, label="+ Ollama runners")
    memory.axhline(timeline.capacity_bytes / GB, color="black", lw=0.8, ls="--")
    memory.set_ylim(0, timeline.capacity_bytes / GB * 1.05)
    memory.set_ylabel("GPU memory (GB)")
    memory.legend(loc="lower right", fontsize=8)

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
