"""One greedy run of one prompt on one variant, measured; and how far two runs agree.

Runs go straight to the backend through `ollama.AsyncClient` (errors translated by backend.py's one
context manager), not through the router, so each variant is the one asked for. Temperature 0 and a
fixed seed make the output the model's greedy path, so two variants of one family can be compared
token by token (they share the tokenizer). Each streamed chunk is one token; when the backend returns
`logprobs` (Ollama ≥ 0.12) the tokens and their top alternatives come from there instead.

Agreement, both pure:
- greedy agreement = the share of the reference's tokens a variant reproduces before its first
  divergence (after that the contexts differ, so later positions compare nothing);
- top-k agreement = over that shared prefix, the mean overlap of the two top-k token sets: how
  similar the distributions were even where the argmax agreed (a stand-in for llama.cpp's KLD).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ollama

from quantrouter.backend import ollama_client, translated
from quantrouter.catalog import VariantInfo
from quantrouter.config import BackendSettings
from quantrouter.units import NS

__all__ = [
    "DEFAULT_SEED",
    "Run",
    "Step",
    "greedy_agreement",
    "measure_variants",
    "run_greedy",
    "top_k_agreement",
    "unload_model",
]

DEFAULT_SEED = 42
TOP_LOGPROBS = 5


@dataclass(frozen=True, slots=True)
class Step:
    """One generated token and, with logprobs, the most likely tokens at that position (best first)."""

    token: str
    top: tuple[str, ...] = ()
    top_logprobs: tuple[float, ...] = ()  # the log-probability of each of `top`

    def distribution(self) -> dict[str, float]:
        """Token → logprob over the top-k (empty without logprobs)."""
        return dict(zip(self.top, self.top_logprobs, strict=False))


@dataclass(frozen=True, slots=True)
class Run:
    """What one greedy generation produced and cost; times in seconds, as Ollama and the client measured."""

    tag: str
    text: str
    steps: tuple[Step, ...]
    time_to_first_token: float
    load_seconds: float
    decode_tps: float
    prompt_tps: float
    eval_count: int
    prompt_eval_count: int

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(s.token for s in self.steps)


async def unload_model(client: ollama.AsyncClient, tag: str) -> None:
    """An empty prompt with keep_alive 0 unloads the model (docs/ollama.md §1), so the next load is cold."""
    with translated(tag):
        await client.generate(model=tag, prompt="", keep_alive=0)


async def measure_variants(backend: BackendSettings, variants: Sequence[VariantInfo], prompts: Sequence[str],
                           num_predict: int, seed: int, unload: bool) -> list[list[tuple[VariantInfo, Run]]]:
    """Per prompt, one greedy run of every variant; each variant unloaded before its first prompt."""
    client = ollama_client(backend)
    per_prompt: list[list[tuple[VariantInfo, Run]]] = [[] for _ in prompts]
    try:
        for v in variants:
            if unload:
                await unload_model(client, v.tag)
            for index, prompt in enumerate(prompts):
                per_prompt[index].append((v, await run_greedy(client, v, prompt, num_predict, seed)))
    finally:
        await client.close()  # type: ignore[no-untyped-call]
    return per_prompt


def _rate(count: int, duration_ns: int) -> float:
    return count * NS / duration_ns if count > 0 and duration_ns > 0 else 0.0


def _steps(part: Any, text: str) -> list[Step]:
    if part.logprobs:
        return [Step(p.token, tuple(t.token for t in p.top_logprobs or ()),
                     tuple(t.logprob for t in p.top_logprobs or ())) for p in part.logprobs]
    return [Step(text)] if text else []


async def run_greedy(client: ollama.AsyncClient, variant: VariantInfo, prompt: str, num_predict: int,
                     seed: int = DEFAULT_SEED, top_logprobs: int = TOP_LOGPROBS) -> Run:
    """Generate `num_predict` tokens at temperature 0 with `seed`, streaming, and measure the run."""
    tag = variant.tag
    options = {"temperature": 0.0, "seed": seed, "num_predict": num_predict}
    started = time.perf_counter()
    first: float | None = None
    texts: list[str] = []
    steps: list[Step] = []
    with translated(tag):
        stream = await client.generate(model=tag, prompt=prompt, options=options, stream=True, logprobs=True,
                                       top_logprobs=top_logprobs)
        async for part in stream:
            text = part.response or ""
            if (text or part.logprobs) and first is None:
                first = time.perf_counter() - started
            texts.append(text)
            steps.extend(_steps(part, text))
            if part.done:
                return Run(tag, "".join(texts), tuple(steps), first if first is not None else 0.0,
                           (part.load_duration or 0) / NS, _rate(part.eval_count or 0, part.eval_duration or 0),
                           _rate(part.prompt_eval_count or 0, part.prompt_eval_duration or 0),
                           part.eval_count or 0, part.prompt_eval_count or 0)
    raise RuntimeError(f"{tag}: the backend closed the stream without a final chunk")


def _shared_prefix(reference: Sequence[str], tokens: Sequence[str]) -> int:
    shared = 0
    for a, b in zip(reference, tokens, strict=False):
        if a != b:
            break
        shared += 1
    return shared


def greedy_agreement(reference: Sequence[str], tokens: Sequence[str]) -> float:
    """Share of the reference's greedy tokens reproduced before the first divergence (1.0 = identical)."""
    if not reference:
        return 1.0 if not tokens else 0.0
    return _shared_prefix(reference, tokens) / len(reference)


def top_k_agreement(reference: Sequence[Step], steps: Sequence[Step]) -> float | None:
    """Mean top-k overlap over the shared prefix (and the first divergent position); None without logprobs."""
    shared = _shared_prefix([s.token for s in reference], [s.token for s in steps])
    pairs = [(r, s) for r, s in list(zip(reference, steps, strict=False))[: shared + 1] if r.top and s.top]
    if not pairs:
        return None
    return sum(len(set(r.top) & set(s.top)) / max(len(r.top), len(s.top)) for r, s in pairs) / len(pairs)
