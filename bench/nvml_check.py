"""The real NVML path on a real GPU: memory probe figures, the bandwidth prior, and routing under pressure.

Runs only where NVML finds a GPU (the lent device machine); elsewhere it says so and leaves the last
results file alone. It drives the router's own `NvmlSource`/`MemoryProbe` with nvidia-ml-py, then
feeds the live free-memory figure into the real policy for the Llama-3.1-8B ladder (sizes from
docs/quantization.md §1) and, when PyTorch is present, takes GPU memory away to show QUALITY stepping
down the ladder and back up when the memory returns.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from quantrouter.catalog import Architecture, VariantInfo
from quantrouter.memory import MemoryProbe, NvmlSource, NvmlUnavailable, StaticSource, load_pynvml
from quantrouter.policy import CandidateInput, MemoryView, RoutingRequest, decide
from quantrouter.quant import parse_quantization
from quantrouter.throughput import ThroughputTable, bandwidth_for
from quantrouter.values import Preference

RESULTS = Path(__file__).parent / "results" / "nvml.md"
GiB = 1 << 30
# Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128, 128k context (docs/ollama.md §3 worked example).
LLAMA_8B = Architecture("llama", 32, 8, 128, 131072)
LADDER_GIB = {"F16": 14.97, "Q8_0": 7.96, "Q6_K": 6.14, "Q5_K_M": 5.33, "Q4_K_M": 4.58, "Q3_K_M": 3.74, "Q2_K": 2.96}
# Ollama's per-GPU reserve on CUDA (docs/quantization.md §3).
RESERVE = 457 << 20
NUM_CTX = 8192
# Free memory (GiB) a stand-in tenant (plain torch allocations) leaves, step by step, then all of it again.
FREE_TARGETS_GIB = (None, 20, 12, 8, 5, None)


def _ladder() -> list[VariantInfo]:
    return [VariantInfo(f"llama3.1:8b-instruct-{name.lower()}", "llama3.1:8b-instruct", parse_quantization(name),
                        int(size * GiB), 8_030_261_248, LLAMA_8B) for name, size in LADDER_GIB.items()]


def _route(probe: MemoryProbe, table: ThroughputTable, preference: Preference) -> str:
    snapshot = probe.sample()
    variants = _ladder()
    candidates = [CandidateInput(v, speed, v.quant.quality) for v, speed in table.snapshot().estimates(variants)]
    decision = decide(RoutingRequest("llama3.1:8b-instruct", preference, num_ctx=NUM_CTX, prompt_tokens=200),
                      candidates, MemoryView(snapshot.free_bytes, RESERVE * len(snapshot.gpus), snapshot.source))
    chosen = decision.chosen.quantization if decision.chosen else "none"
    return f"{chosen}{' (downgraded)' if decision.downgraded else ''}"


def main() -> None:
    argparse.ArgumentParser(prog="python -m bench.nvml_check", description=__doc__.split("\n\n")[0]).parse_args()
    try:
        nvml = load_pynvml()
        source = NvmlSource(nvml)
        source.start()
    except NvmlUnavailable as error:
        print(f"nvml_check: no GPU here ({error}); the last GPU figures stay in {RESULTS}")
        return
    started = time.perf_counter()
    first = source.read(time.monotonic())
    read_us = (time.perf_counter() - started) * 1e6
    probe = MemoryProbe(StaticSource(0, lambda: 0), source, interval=0.25)
    table = ThroughputTable(0.3, bandwidth_for(g.name for g in first.gpus))
    lines = [f"# NVML on a real GPU ({datetime.date.today().isoformat()})", "",
             "Produced by `bench/nvml_check.py` on the lent GPU machine through the router's own `NvmlSource`.", "",
             "| GPU | UUID | free | total |", "|---|---|---|---|"]
    lines += [f"| {g.name} | {g.uuid} | {g.free_bytes / GiB:.2f} GiB | {g.total_bytes / GiB:.2f} GiB |"
              for g in first.gpus]
    samples = []
    for _ in range(200):
        t = time.perf_counter()
        source.read(time.monotonic())
        samples.append((time.perf_counter() - t) * 1e6)
    samples.sort()
    lines += ["", f"First read {read_us:.0f} µs; 200 reads: p50 {samples[100]:.0f} µs, p99 {samples[197]:.0f} µs.",
              f"Bandwidth prior chosen from the device name: {table.bandwidth / 1e12:.2f} TB/s.", "",
              "Routing the Llama-3.1-8B ladder (num_ctx 8192) as memory is taken away on the GPU:", "",
              "| held by another tenant | NVML free | QUALITY | BALANCED | LATENCY |", "|---|---|---|---|---|"]
    try:
        import torch  # type: ignore[import-not-found]  # present on the GPU machine, not a dependency
    except ImportError:
        torch = None
    held: list[object] = []
    for target in FREE_TARGETS_GIB:
        if torch is not None:
            held.clear()
            torch.cuda.empty_cache()
            take = probe.sample().free_bytes - int(target * GiB) if target is not None else 0
            if take > 0:
                held.append(torch.empty(take, dtype=torch.uint8, device="cuda"))
            torch.cuda.synchronize()
        taken = sum(t.numel() for t in held) / GiB  # type: ignore[attr-defined]
        free = probe.sample().free_bytes
        row = [_route(probe, table, p) for p in (Preference.QUALITY, Preference.BALANCED, Preference.LATENCY)]
        lines.append(f"| {taken:.1f} GiB | {free / GiB:.2f} GiB | " + " | ".join(row) + " |")
    source.close()
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
