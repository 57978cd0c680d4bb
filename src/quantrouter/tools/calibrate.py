"""`calibrate`: measure every variant of a family on a small prompt set and write the router's calibration file.

The router loads the file at start (`serve --calibration FILE`, quantrouter.calibration) and seeds its
throughput table with it, so the first real requests are routed on measurements, not priors. Decode
and prompt rates are token-weighted over the prompts (total tokens ÷ total time), load time is the
cold load before the first prompt, agreement the mean greedy agreement with the highest-precision
variant. With `quality`, each variant's KL divergence, top-token agreement and perplexity ratio against
that variant are measured on the shipped evaluation text too (quantrouter.tools.quality): from
llama.cpp's logits when the GGUF files are at hand (the embedded backend), else from the backend's
top-k logprobs (an approximation), else a ToolError that says what to use instead.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from quantrouter.backend import ollama_client
from quantrouter.calibration import CalibrationFile, MeasuredQuality, VariantCalibration, write_calibration
from quantrouter.catalog import VariantInfo
from quantrouter.config import Settings
from quantrouter.tools.errors import ToolError
from quantrouter.tools.live import family_variants, read_catalog, select_quants
from quantrouter.tools.measure import DEFAULT_SEED, Run, greedy_agreement, measure_variants, run_greedy
from quantrouter.tools.quality import (
    OLLAMA_TOP_K,
    EvaluationText,
    compare_top_k,
    score_gguf_files,
    summarise,
)

__all__ = ["CALIBRATION_PROMPTS", "Calibration", "calibrate_family", "calibration_of", "format_calibration"]

# Ollama returns at most 20 alternatives per position (`top_logprobs`); the more, the closer the KL.
OLLAMA_MAX_TOP_LOGPROBS = 20
# Tokens each variant generates per evaluation prompt on the logprobs path.
LOGPROBS_NUM_PREDICT = 48
# Given the number of steps, a callback told the variant of each finished step (a progress bar).
Progress = Callable[[str], None]
ProgressFactory = Callable[[int], Progress]

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
    quality_text: Mapping[str, Any] | None = None


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
                    seed: int = DEFAULT_SEED, host: str | None = None, quality: EvaluationText | None = None,
                    gguf_files: Mapping[str, Path] | None = None,
                    progress: ProgressFactory | None = None) -> Calibration:
    """Measure the family's variants (or those in `quants`, plus the reference) and write `path`.

    With `quality` (the evaluation text, usually `evaluation_text()`), `gguf_files` (tag → file, the
    embedded backend's) selects llama.cpp's logits; without it the backend's logprobs are used.
    Nothing is written unless every measurement finished.
    """
    name, variants = family_variants(await read_catalog(settings, host), family)
    reference = variants[0]
    chosen = (reference, *(v for v in select_quants(name, variants, quants) if v != reference))
    text = quality
    qualities: dict[str, MeasuredQuality] = {}
    if text is not None:
        steps = len(chosen) * len(text.entries)
        report = progress(steps) if progress is not None else (lambda tag: None)
        if gguf_files is not None:
            files = {v.tag: _file_for(gguf_files, v.tag) for v in chosen}
            qualities = await asyncio.to_thread(score_gguf_files, files, reference.tag, text, _threads(), report)
        else:
            qualities = await _quality_from_logprobs(settings, chosen, text, host, report)
    per_prompt = await measure_variants(settings.backend.at(host), chosen, prompts, num_predict, seed, True)
    measured = {tag: replace(c, quality=qualities.get(tag)) for tag, c in calibration_of(per_prompt,
                                                                                          reference.tag).items()}
    provenance = dict(text.provenance) if text is not None else None
    write_calibration(path, CalibrationFile(datetime.now(UTC).isoformat(timespec="seconds"), measured,
                                            reference.tag, provenance))
    return Calibration(name, reference.tag, measured, path, provenance)


def _threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _file_for(files: Mapping[str, Path], tag: str) -> Path:
    if tag not in files:
        raise ToolError(f"{tag} is not one of the embedded backend's GGUF files; llama.cpp logits need the file")
    return files[tag]


async def _quality_from_logprobs(settings: Settings, chosen: Sequence[VariantInfo], text: EvaluationText,
                                 host: str | None, progress: Progress) -> dict[str, MeasuredQuality]:
    """Each variant's greedy top-k logprobs on each evaluation prompt, compared with the reference's."""
    client = ollama_client(settings.backend.at(host))
    try:
        probe = await run_greedy(client, chosen[0], text.entries[0][0], 1, top_logprobs=OLLAMA_MAX_TOP_LOGPROBS)
        if not any(step.top_logprobs for step in probe.steps):
            raise ToolError(f"the backend at {host or settings.backend.host} returned no logprobs, so quality "
                            "cannot be measured there: use `calibrate --quality --embedded` (llama.cpp's logits "
                            "from the GGUF files) or an Ollama that returns logprobs (0.12 or later)")
        runs: dict[str, list[Run]] = {}
        for v in chosen:
            runs[v.tag] = []
            for prompt, _ in text.entries:
                runs[v.tag].append(await run_greedy(client, v, prompt, LOGPROBS_NUM_PREDICT,
                                                    top_logprobs=OLLAMA_MAX_TOP_LOGPROBS))
                progress(v.tag)
    finally:
        await client.close()  # type: ignore[no-untyped-call]
    reference = runs[chosen[0].tag]
    return {tag: summarise([compare_top_k(r.steps, o.steps) for r, o in zip(reference, own, strict=True)],
                           OLLAMA_TOP_K) for tag, own in runs.items()}


def format_calibration(calibration: Calibration) -> str:
    lines = [f"{calibration.family}: {len(calibration.variants)} variants, reference {calibration.reference}",
             f"  {'tag':<24} {'decode tok/s':>12} {'prompt tok/s':>12} {'load':>8} {'n':>3} {'agree':>6}"
             f"{'  top-1 (same top p)':>22} {'mean KLD':>18} {'PPL ratio':>17}"]
    for tag, c in sorted(calibration.variants.items(), key=lambda item: -item[1].decode_tps):
        agreement = f"{c.agreement:.2f}" if c.agreement is not None else "—"
        q = c.quality
        measured = (f"{q.top1:>12.4f} ±{q.top1_stderr:.4f} {q.kl_mean:>9.5f} ±{q.kl_stderr:.5f} "
                    f"{q.ppl_ratio:>8.4f} ±{q.ppl_ratio_stderr:.4f}") if q is not None else f"{'—':>22}"
        lines.append(f"  {tag:<24} {c.decode_tps:>12.1f} {c.prompt_tps:>12.1f} {c.load_seconds * 1000:>6.0f}ms "
                     f"{c.samples:>3} {agreement:>6}  {measured}")
    methods = {c.quality.method for c in calibration.variants.values() if c.quality is not None}
    if methods:
        positions = max(c.quality.positions for c in calibration.variants.values() if c.quality is not None)
        lines.append(f"quality: {', '.join(sorted(methods))}; {positions} scored positions of the shipped "
                     "evaluation text; ± one standard error")
    lines.append(f"wrote {calibration.path}; start the router with: quantrouter serve --calibration {calibration.path}")
    return "\n".join(lines)
