"""`calibrate`: measure every variant of a family on a small prompt set and write the router's calibration file.

The router loads the file at start (`serve --calibration FILE`, quantrouter.calibration) and seeds its
throughput table with it, so the first real requests are routed on measurements, not priors. Decode
and prompt rates are token-weighted over the prompts (total tokens ÷ total time), load time is the
cold load before the first prompt, agreement the mean greedy agreement with the highest-precision
variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from quantrouter.calibration import VariantCalibration, write_calibration
from quantrouter.catalog import VariantInfo
from quantrouter.config import Settings
from quantrouter.tools.live import family_variants, read_catalog, select_quants
from quantrouter.tools.measure import DEFAULT_SEED, Run, greedy_agreement, measure_variants

__all__ = ["CALIBRATION_PROMPTS", "Calibration", "calibrate_family", "calibration_of", "format_calibration"]

# Short, varied prompts: a fact, an explanation, code, a list. Enough to exercise prompt processing and
# decode without taking minutes per variant.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the factorial of n.",
    "List three uses of a hash map.",
)
DEFAULT_NUM_PREDICT = 32


@dataclass(frozen=True, slots=True)
class Calibration:
    """What `calibrate` measured for a family and wrote to `path`, for the router to start from."""

    family: str
    reference: str
    variants: dict[str, VariantCalibration]
    path: Path


def _weighted(runs: Sequence[Run], rate: str, count: str) -> float:
    """Total tokens ÷ total seconds, so long runs weigh more than short ones."""
    tokens = sum(getattr(r, count) for r in runs)
    seconds = sum(getattr(r, count) / getattr(r, rate) for r in runs if getattr(r, rate) > 0)
    return tokens / seconds if seconds > 0 else 0.0


def calibration_of(per_prompt: Sequence[Sequence[tuple[VariantInfo, Run]]],
                   reference_tag: str) -> dict[str, VariantCalibration]:
    """Fold per-prompt runs into one `VariantCalibration` per tag (pure)."""
    by_tag: dict[str, list[Run]] = {}
    agreements: dict[str, list[float]] = {}
    for runs in per_prompt:
        reference = next(run for v, run in runs if v.tag == reference_tag)
        for v, run in runs:
            by_tag.setdefault(v.tag, []).append(run)
            agreements.setdefault(v.tag, []).append(greedy_agreement(reference.tokens, run.tokens))
    return {tag: VariantCalibration(decode_tps=_weighted(runs, "decode_tps", "eval_count"),
                                    prompt_tps=_weighted(runs, "prompt_tps", "prompt_eval_count"),
                                    load_seconds=runs[0].load_seconds, samples=len(runs),
                                    agreement=sum(agreements[tag]) / len(agreements[tag]))
            for tag, runs in by_tag.items()}


async def calibrate_family(settings: Settings, family: str, path: Path, quants: Sequence[str] = (), *,
                    prompts: Sequence[str] = CALIBRATION_PROMPTS, num_predict: int = DEFAULT_NUM_PREDICT,
                    seed: int = DEFAULT_SEED, host: str | None = None) -> Calibration:
    """Measure the family's variants (or those in `quants`, plus the reference) and write `path`."""
    name, variants = family_variants(await read_catalog(settings, host), family)
    reference = variants[0]
    chosen = (reference, *(v for v in select_quants(name, variants, quants) if v != reference))
    per_prompt = await measure_variants(settings.backend.at(host), chosen, prompts, num_predict, seed, True)
    measured = calibration_of(per_prompt, reference.tag)
    write_calibration(path, measured, datetime.now(UTC).isoformat(timespec="seconds"))
    return Calibration(name, reference.tag, measured, path)


def format_calibration(calibration: Calibration) -> str:
    lines = [f"{calibration.family}: {len(calibration.variants)} variants, reference {calibration.reference}",
             f"  {'tag':<24} {'decode tok/s':>12} {'prompt tok/s':>12} {'load':>8} {'n':>3} {'agree':>6}"]
    for tag, c in sorted(calibration.variants.items(), key=lambda item: -item[1].decode_tps):
        agreement = f"{c.agreement:.2f}" if c.agreement is not None else "—"
        lines.append(f"  {tag:<24} {c.decode_tps:>12.1f} {c.prompt_tps:>12.1f} {c.load_seconds * 1000:>6.0f}ms "
                     f"{c.samples:>3} {agreement:>6}")
    lines.append(f"wrote {calibration.path}; start the router with: quantrouter serve --calibration {calibration.path}")
    return "\n".join(lines)
