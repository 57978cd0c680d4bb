"""Decode tokens/sec and load time per ladder variant of the embedded backend, through the ollama client,
against a bare llama.cpp loop in this process on the same file (the baseline, measured in the same run).

Run: `python bench/embedded_throughput.py [--runs 3] [--tokens 64]`. Prints a table and writes
bench/results/embedded_throughput.md with the machine it ran on. Each variant is first unloaded, then
loaded by an empty prompt (load time = that request's load_duration), then generates greedily; then,
with the server's copy unloaded, llama-cpp-python alone generates the same tokens (no HTTP, no server).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import ollama

from quantrouter.config import default_cache_dir
from quantrouter.embedded import EmbeddedConfig, LadderEntry, prepare_ladder, run_embedded_in_thread

RESULTS = Path(__file__).parent / "results" / "embedded_throughput.md"
PROMPT = "The capital of France is"
NS_PER_S = 1e9
MS_PER_NS = 1e-6
MiB = 1 << 20
DEFAULT_RUNS = 3
DEFAULT_TOKENS = 64
DEFAULT_THREADS = 2
# Every variant fits at once, so loads are never slowed by evictions.
BUDGET = 4096 * MiB
# The embedded server's default context, so both sides hold the same KV cache.
BARE_NUM_CTX = 2048
MS_PER_S = 1e3


@dataclass(frozen=True, slots=True)
class Row:
    """One variant's measurements."""

    tag: str
    size_mib: float
    load_ms: float
    decode_tps: list[float]
    prompt_tps: list[float]
    answer: str
    bare_tps: list[float]

    @property
    def ratio(self) -> float:
        """Median decode speed through the Ollama API as a share of the bare loop's."""
        return statistics.median(self.decode_tps) / statistics.median(self.bare_tps)


def measure_bare(path: Path, runs: int, tokens: int, threads: int) -> list[float]:
    """The same greedy generations with llama-cpp-python alone; tok/s from llama.cpp's own decode timer."""
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(path), n_ctx=BARE_NUM_CTX, n_threads=threads, n_threads_batch=threads,
                            verbose=False)
    try:
        speeds = []
        for _ in range(runs):
            model.reset()
            llama_cpp.llama_perf_context_reset(model.ctx)
            model.create_completion(PROMPT, max_tokens=tokens, temperature=0, seed=0)
            perf = llama_cpp.llama_perf_context(model.ctx)
            speeds.append(perf.n_eval / perf.t_eval_ms * MS_PER_S)
        return speeds
    finally:
        model.close()


def measure(client: ollama.Client, entry: LadderEntry, runs: int, tokens: int, threads: int) -> Row:
    """`runs` greedy generations of `tokens` tokens; the first starts cold, so its load_duration is the load.
    Then the bare loop's runs, once the server has unloaded the variant."""
    tag = entry.tag
    client.generate(model=tag, prompt="", keep_alive=0)
    decode, prompt, loads, answer = [], [], [], ""
    options = {"num_predict": tokens, "temperature": 0, "seed": 0}
    for _ in range(runs):
        result = client.generate(model=tag, prompt=PROMPT, raw=True, options=options)
        decode.append((result.eval_count or 0) / (result.eval_duration or 1) * NS_PER_S)
        prompt.append((result.prompt_eval_count or 0) / (result.prompt_eval_duration or 1) * NS_PER_S)
        loads.append((result.load_duration or 0) * MS_PER_NS)
        answer = result.response or ""
    client.generate(model=tag, prompt="", keep_alive=0)
    return Row(tag, entry.size / MiB, loads[0], decode, prompt, answer, measure_bare(entry.path, runs, tokens, threads))


def machine() -> str:
    """CPU model, cores and load, read where Linux reports them."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average before the run {load}"


def report(rows: list[Row], runs: int, tokens: int, threads: int) -> str:
    """The results as a markdown table."""
    lines = [
        "# Embedded backend throughput (llama.cpp, Gemma 3 270M ladder)",
        "",
        f"- Date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Machine: {machine()}",
        f"- Method: `python bench/embedded_throughput.py`; per variant {runs} greedy runs of {tokens} tokens "
        f"on the raw prompt {PROMPT!r}, n_threads={threads}, "
        "through `ollama.Client`; the first run starts cold and its load_duration is the load time. "
        "tok/s = eval_count / eval_duration.",
        "- Baseline: a bare llama.cpp loop, `llama_cpp.Llama.create_completion` on the same file in the "
        f"benchmark's own process (n_ctx={BARE_NUM_CTX}, same threads, same prompt and token count), right after "
        "the server unloaded that variant; tok/s = n_eval / t_eval from llama.cpp's own timer. "
        "\"via API\" = the median through the Ollama API as a share of the bare median.",
        "- Everything above Q4_K_M is requantized from the Q4_K_M source: sizes and speeds are real, "
        "their quality edge over Q4_K_M is nominal.",
        "",
        "| variant | MiB | load ms | decode tok/s (median) | decode min–max | bare llama.cpp tok/s (median) "
        "| via API | prompt tok/s | answer starts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        answer = row.answer.strip().replace("\n", " ").replace("|", "/")[:48]
        lines.append(
            f"| {row.tag} | {row.size_mib:.0f} | {row.load_ms:.0f} | {statistics.median(row.decode_tps):.1f} | "
            f"{min(row.decode_tps):.1f}–{max(row.decode_tps):.1f} | {statistics.median(row.bare_tps):.1f} | "
            f"{row.ratio:.0%} | {statistics.median(row.prompt_tps):.0f} | {answer}… |")
    ratios = [row.ratio for row in rows]
    lines += ["", f"Reading: through the Ollama API the embedded backend decodes at {min(ratios):.0%}–"
              f"{max(ratios):.0%} of the speed of a bare llama.cpp loop on the same file, machine and run."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = parser.parse_args()
    cache_dir = default_cache_dir(os.environ)
    ladder = prepare_ladder(cache_dir)
    config = EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=BUDGET, n_threads=args.threads)
    with run_embedded_in_thread(config) as server, ollama.Client(host=server.url) as client:
        rows = [measure(client, e, args.runs, args.tokens, args.threads) for e in ladder]
    text = report(rows, args.runs, args.tokens, args.threads)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
