"""`compare`: the same prompt, greedy, on each variant of a family; speed and agreement side by side.

The reference is always the family's highest-precision variant, run even when `quants` leaves it
out, because agreement means nothing without it. Each variant is unloaded first (unless asked not
to), so its load time is a cold load, as a router's first request to it would see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quantrouter.catalog import VariantInfo
from quantrouter.config import Settings
from quantrouter.tools.errors import ToolError
from quantrouter.tools.live import family_variants, read_catalog, select_quants
from quantrouter.tools.measure import DEFAULT_SEED, Run, greedy_agreement, measure_variants, top_k_agreement

__all__ = ["Comparison", "VariantResult", "compare_runs", "compare_variants", "format_comparison", "plot_comparison"]

DEFAULT_NUM_PREDICT = 48
ANSWER_PREVIEW = 48


@dataclass(frozen=True, slots=True)
class VariantResult:
    """One variant's run, and how far its greedy tokens and top-k sets agree with the reference's."""

    variant: VariantInfo
    run: Run
    agreement: float
    top_k_agreement: float | None


@dataclass(frozen=True, slots=True)
class Comparison:
    """Every variant's answer to one prompt beside the highest-precision variant's (the reference)."""

    family: str
    prompt: str
    reference: str
    results: tuple[VariantResult, ...]


def compare_runs(runs: Sequence[tuple[VariantInfo, Run]], reference_tag: str) -> tuple[VariantResult, ...]:
    """Each run's agreement with the reference run (pure)."""
    reference = next((run for v, run in runs if v.tag == reference_tag), None)
    if reference is None:
        raise ValueError(f"no run of the reference {reference_tag}")
    return tuple(VariantResult(v, run, greedy_agreement(reference.tokens, run.tokens),
                               top_k_agreement(reference.steps, run.steps)) for v, run in runs)


async def compare_variants(settings: Settings, family: str, prompt: str, quants: Sequence[str] = (), *,
                  num_predict: int = DEFAULT_NUM_PREDICT, seed: int = DEFAULT_SEED, unload: bool = True,
                  host: str | None = None) -> Comparison:
    """Run `prompt` on the chosen variants of `family` (all by default) plus its highest-precision one."""
    if not prompt:
        raise ToolError("compare needs a prompt (--prompt TEXT)")
    name, variants = family_variants(await read_catalog(settings, host), family)
    reference = variants[0]
    chosen = (reference, *(v for v in select_quants(name, variants, quants) if v != reference))
    [runs] = await measure_variants(settings.backend.at(host), chosen, [prompt], num_predict, seed, unload)
    return Comparison(name, prompt, reference.tag, compare_runs(runs, reference.tag))


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= ANSWER_PREVIEW else flat[: ANSWER_PREVIEW - 1] + "…"


def format_comparison(comparison: Comparison) -> str:
    lines = [f"{comparison.family}: {comparison.prompt!r}, temperature 0, reference {comparison.reference}",
             f"  {'tag':<24} {'quant':<7} {'tok/s':>7} {'prompt':>8} {'ttft':>7} {'load':>7} {'agree':>6} "
             f"{'top-k':>6}  answer starts"]
    for r in comparison.results:
        run = r.run
        top_k = f"{r.top_k_agreement:.2f}" if r.top_k_agreement is not None else "—"
        lines.append(f"  {run.tag:<24} {r.variant.quant.name:<7} {run.decode_tps:>7.1f} {run.prompt_tps:>8.1f} "
                     f"{run.time_to_first_token * 1000:>5.0f}ms {run.load_seconds * 1000:>5.0f}ms "
                     f"{r.agreement:>6.2f} {top_k:>6}  {_preview(run.text)}")
    lines.append("agree: share of the reference's greedy tokens reproduced before the first divergence; "
                 "top-k: overlap of the top-5 alternatives over that prefix (— when the backend returns no logprobs)")
    return "\n".join(lines)


def plot_comparison(comparison: Comparison, path: Path) -> None:
    """Decode tok/s against agreement, one labelled point per variant (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise ToolError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for r in comparison.results:
        axes.scatter(r.run.decode_tps, r.agreement)
        axes.annotate(r.variant.quant.name, (r.run.decode_tps, r.agreement), textcoords="offset points",
                      xytext=(4, 4))
    axes.set_xlabel("decode tokens/s")
    axes.set_ylabel(f"greedy agreement with {comparison.reference}")
    axes.set_ylim(-0.05, 1.05)
    axes.set_title(f"{comparison.family}: speed vs quality")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
