"""Measured quality: each variant against its highest-precision sibling on one fixed evaluation text.

The measures are those llama.cpp's perplexity tool reports with `--kl-divergence`
(reference/quant.md §1b): mean KL divergence of the next-token distributions (reference ‖ variant),
"same top p" (the share of positions where both put the same token first) and the perplexity ratio
PPL(variant)/PPL(reference), each with a standard error over the scored positions.

- Embedded (llama.cpp): the GGUF files are scored directly, every position's full logits read from
  llama.cpp; exact.
- Ollama: no logits, only the top-k logprobs of what a model generates, and no way to force a text.
  Each variant generates greedily from each prompt; positions are compared while its tokens still
  equal the reference's (same context), over the union of the two top-k sets. An approximation, and
  the calibration file says so (`method`).

The evaluation text ships with the package (quantrouter/data/evaluation_text.json, provenance inside):
fixed prompts, each followed by the reference variant's own sampled continuation; the continuation
tokens are scored with the prompt as context.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantrouter.calibration import MeasuredQuality
from quantrouter.tools.errors import ToolError
from quantrouter.tools.measure import Step

__all__ = [
    "LLAMA_CPP_LOGITS",
    "OLLAMA_TOP_K",
    "EvaluationText",
    "PositionScores",
    "compare_positions",
    "compare_top_k",
    "evaluation_text",
    "score_gguf_files",
    "summarise",
]

LLAMA_CPP_LOGITS = "llama.cpp logits, full vocabulary"
OLLAMA_TOP_K = "Ollama top-k logprobs over the greedy prefix shared with the reference (approximation)"
# Below any top-k logprob a backend reports: stands in for a token missing from one side's top-k.
_FLOOR_MARGIN = math.log(2.0)

if TYPE_CHECKING:  # numpy comes with the embedded and tools extras, not with the router's image
    import numpy as np
    import numpy.typing as npt

    Floats = npt.NDArray[np.float64]
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class EvaluationText:
    """Prompts and their continuations; `provenance` says who made the text and how."""

    entries: tuple[tuple[str, str], ...]  # (prompt, prompt + continuation)
    provenance: Mapping[str, Any]


def evaluation_text() -> EvaluationText:
    """The text shipped with the package."""
    body = json.loads(resources.files("quantrouter").joinpath("data/evaluation_text.json").read_text())
    return EvaluationText(tuple((e["prompt"], e["text"]) for e in body["entries"]), body["provenance"])


@dataclass(frozen=True, slots=True)
class PositionScores:
    """Per scored position: KL(reference ‖ variant), top token agreement, and both negative log-likelihoods."""

    kl: Floats
    same_top: Floats
    nll_reference: Floats
    nll_variant: Floats


def _log_softmax(logits: npt.NDArray[np.float32]) -> Floats:
    import numpy as np

    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    result: Floats = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def compare_positions(reference_logits: npt.NDArray[np.float32], variant_logits: npt.NDArray[np.float32],
                      targets: npt.NDArray[np.int64]) -> PositionScores:
    """Row i of each logits array predicts `targets[i]` (pure)."""
    import numpy as np

    reference, variant = _log_softmax(reference_logits), _log_softmax(variant_logits)
    rows = np.arange(len(targets))
    kl = (np.exp(reference) * (reference - variant)).sum(axis=-1)
    same = (reference.argmax(axis=-1) == variant.argmax(axis=-1)).astype(np.float64)
    return PositionScores(np.maximum(kl, 0.0), same, -reference[rows, targets], -variant[rows, targets])


def compare_top_k(reference: Sequence[Step], variant: Sequence[Step]) -> PositionScores:
    """Ollama's top-k logprobs of two greedy runs, over the positions whose context is still shared (pure).

    Position j is compared while tokens 0..j-1 agree (so up to and including the first divergence).
    KL runs over the union of both top-k sets, a token missing from one side taking a logprob just below
    that side's smallest; the likelihoods are of the reference's own token.
    """
    import numpy as np

    kl, same, nll_ref, nll_var = [], [], [], []
    for r, v in zip(reference, variant, strict=False):
        ref, var = r.distribution(), v.distribution()
        if not ref or not var:
            break
        floor_r, floor_v = min(ref.values()) - _FLOOR_MARGIN, min(var.values()) - _FLOOR_MARGIN
        tokens = sorted(set(ref) | set(var))
        p = np.array([ref.get(t, floor_r) for t in tokens])
        q = np.array([var.get(t, floor_v) for t in tokens])
        p, q = p - np.logaddexp.reduce(p), q - np.logaddexp.reduce(q)
        kl.append(max(float((np.exp(p) * (p - q)).sum()), 0.0))
        same.append(1.0 if r.token == v.token else 0.0)
        nll_ref.append(-ref.get(r.token, floor_r))
        nll_var.append(-var.get(r.token, floor_v))
        if r.token != v.token:
            break
    return PositionScores(np.array(kl), np.array(same), np.array(nll_ref), np.array(nll_var))


def _stderr(values: Floats) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def summarise(scores: Sequence[PositionScores], method: str) -> MeasuredQuality:
    """Means and standard errors over every scored position, as llama.cpp's perplexity tool reports them."""
    import numpy as np

    kl = np.concatenate([s.kl for s in scores])
    same = np.concatenate([s.same_top for s in scores])
    if len(kl) == 0:
        raise ToolError("no position could be compared; the evaluation text is empty")
    log_ratio = np.concatenate([s.nll_variant - s.nll_reference for s in scores])
    ratio = math.exp(float(log_ratio.mean()))
    top1 = float(same.mean())
    return MeasuredQuality(
        method=method, positions=len(kl), top1=top1,
        top1_stderr=math.sqrt(top1 * (1 - top1) / len(same)),
        kl_mean=float(kl.mean()), kl_stderr=_stderr(kl),
        ppl_ratio=ratio, ppl_ratio_stderr=ratio * _stderr(log_ratio))


def score_gguf_files(files: Mapping[str, Path], reference: str, text: EvaluationText, n_threads: int,
                     progress: Progress) -> dict[str, MeasuredQuality]:
    """Score every file against `files[reference]` with llama.cpp's logits (blocking; minutes for a ladder).

    The reference's logits at the scored positions are kept in memory (positions × vocabulary float32),
    so each variant is loaded once.
    """
    from quantrouter.embedded.engine import load_scorer, position_logits

    scorer = load_scorer(files[reference], _context_for(text), n_threads)
    try:
        tokenized = [_tokens(scorer, prompt, whole) for prompt, whole in text.entries]
        kept = []
        for tokens, start in tokenized:
            kept.append(position_logits(scorer, tokens)[start - 1:-1])
            progress(reference)
    finally:
        scorer.close()
    results = {reference: summarise([compare_positions(k, k, _targets(t, s)) for k, (t, s) in
                                     zip(kept, tokenized, strict=True)], LLAMA_CPP_LOGITS)}
    for tag, path in files.items():
        if tag == reference:
            continue
        scorer = load_scorer(path, _context_for(text), n_threads)
        try:
            scores = []
            for reference_logits, (tokens, start) in zip(kept, tokenized, strict=True):
                variant_logits = position_logits(scorer, tokens)[start - 1:-1]
                scores.append(compare_positions(reference_logits, variant_logits, _targets(tokens, start)))
                progress(tag)
        finally:
            scorer.close()
        results[tag] = summarise(scores, LLAMA_CPP_LOGITS)
    return results


def _context_for(text: EvaluationText) -> int:
    """A context that holds the longest entry (a token is at least one byte, plus BOS), in blocks of 256."""
    longest = max(len(whole.encode()) for _, whole in text.entries) + 1
    return -(-longest // 256) * 256


def _tokens(scorer: Any, prompt: str, whole: str) -> tuple[list[int], int]:
    """The entry's tokens and where its continuation starts (the prompt is context, not scored)."""
    tokens = scorer.tokenize(whole)
    return tokens, max(len(scorer.tokenize(prompt)), 1)


def _targets(tokens: Sequence[int], start: int) -> npt.NDArray[np.int64]:
    import numpy as np

    return np.array(tokens[start:], dtype=np.int64)
