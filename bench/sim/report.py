"""Per-policy figures from simulation runs, and the markdown, CSV and PNG that carry them."""

from __future__ import annotations

import csv
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.sim.engine import Outcome, RunResult

GB = 1e9
ORACLE_PREFIX = "oracle"


@dataclass(frozen=True, slots=True)
class Summary:
    """One policy on one scenario, pooled over seeds."""

    scenario: str
    policy: str
    seeds: int
    requests: int
    goodput_qw_tok_s: float
    goodput_vs_oracle: float
    slo_attainment: float
    completed: int
    rejected: int
    deadline_failed: int
    cold_loads: int
    evicting_loads: int
    partial_offload_loads: int
    p50_latency_s: float
    p95_latency_s: float
    mean_quality: float
    picks: str


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(scenario: str, policy: str, runs: Sequence[RunResult], duration: float) -> Summary:
    """Quality-weighted goodput = Σ quality × output tokens over requests that met their SLO, per second."""
    results = [r for run in runs for r in run.results]
    met = [r for r in results if r.slo_met]
    done = [r for r in results if r.outcome is Outcome.COMPLETED]
    picks = Counter(r.tag.rsplit("-", 1)[-1] for r in results if r.tag)
    total = sum(picks.values()) or 1
    return Summary(
        scenario, policy, len(runs), len(results),
        sum(r.quality * r.request.output_tokens for r in met) / (duration * len(runs)), float("nan"),
        len(met) / max(len(results), 1), len(done), sum(r.outcome is Outcome.REJECTED for r in results),
        sum(r.outcome is Outcome.DEADLINE for r in results), sum(run.loads for run in runs),
        sum(run.evicting_loads for run in runs), sum(run.partial_loads for run in runs),
        _percentile([r.latency for r in done], 0.50), _percentile([r.latency for r in done], 0.95),
        statistics.fmean([r.quality for r in done]) if done else 0.0,
        " ".join(f"{q}:{n / total:.0%}" for q, n in picks.most_common(3)),
    )


def relative_to_oracle(summaries: Sequence[Summary]) -> list[Summary]:
    """Goodput as a fraction of the better oracle's."""
    oracle = max(s.goodput_qw_tok_s for s in summaries if s.policy.startswith(ORACLE_PREFIX))
    return [Summary(**{**asdict(s), "goodput_vs_oracle": s.goodput_qw_tok_s / oracle if oracle else float("nan")})
            for s in summaries]


def write_csv(path: Path, summaries: Sequence[Summary]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f.name for f in fields(Summary)])
        for s in summaries:
            writer.writerow([f"{v:.4g}" if isinstance(v, float) else v for v in asdict(s).values()])


def markdown_table(summaries: Sequence[Summary]) -> str:
    head = ("| policy | goodput (q·tok/s) | vs oracle | SLO met | deadline fails | rejected | cold loads "
            "| evicting loads | partial offload | p50 s | p95 s | mean quality | picks |")
    rows = [head, "|" + "---|" * 13]
    for s in summaries:
        rows.append(f"| {s.policy} | {s.goodput_qw_tok_s:.1f} | {s.goodput_vs_oracle:.2f} | {s.slo_attainment:.1%} "
                    f"| {s.deadline_failed} | {s.rejected} | {s.cold_loads} | {s.evicting_loads} "
                    f"| {s.partial_offload_loads} | {s.p50_latency_s:.2f} | {s.p95_latency_s:.2f} "
                    f"| {s.mean_quality:.3f} | {s.picks} |")
    return "\n".join(rows)


def plot_scenario(path: Path, title: str, summaries: Sequence[Summary], timeline: RunResult,
                  timeline_policy: str, quant_names: Sequence[str], duration: float) -> None:
    """Three panels: goodput vs the oracle, latency, and one quantrouter run over time."""
    fig, (ax_goodput, ax_latency, ax_time) = plt.subplots(1, 3, figsize=(17, 5.2),
                                                          gridspec_kw={"width_ratios": [1.2, 1, 1.5]})
    names = [s.policy for s in summaries]
    y = range(len(summaries))
    colors = ["tab:blue" if n.startswith("quantrouter") else "tab:green" if n.startswith(ORACLE_PREFIX)
              else "tab:gray" for n in names]
    ax_goodput.barh(list(y), [s.goodput_qw_tok_s for s in summaries], color=colors)
    for i, s in enumerate(summaries):
        ax_goodput.text(s.goodput_qw_tok_s, i, f" {s.goodput_vs_oracle:.2f}× oracle, SLO {s.slo_attainment:.0%}",
                        va="center", fontsize=8)
    ax_goodput.set_yticks(list(y), names)
    ax_goodput.invert_yaxis()
    ax_goodput.set_xlabel("quality-weighted goodput (tok/s)")
    ax_goodput.set_xlim(0, max(s.goodput_qw_tok_s for s in summaries) * 1.7)
    ax_goodput.set_title("goodput (higher is better)")

    width = 0.4
    ax_latency.barh([i - width / 2 for i in y], [s.p50_latency_s for s in summaries], width, label="p50")
    ax_latency.barh([i + width / 2 for i in y], [s.p95_latency_s for s in summaries], width, label="p95")
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
