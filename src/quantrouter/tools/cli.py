"""`quantrouter recommend | compare | calibrate | ladder`: the quantization tools on the command line.

Each handler takes `(args, settings)` like the rest of the CLI; `--ollama-host`, `--cache-dir` and
`--embedded` flow into `Settings` by name. A `ToolError` or a backend error becomes one line on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quantrouter.calibration import CalibrationError
from quantrouter.catalog import Architecture
from quantrouter.client import RouterClient
from quantrouter.config import ConfigError, Settings, parse_bytes
from quantrouter.errors import QuantrouterError
from quantrouter.tools.calibrate import CALIBRATION_PROMPTS, calibrate_family, format_calibration
from quantrouter.tools.calibrate import DEFAULT_NUM_PREDICT as CALIBRATION_NUM_PREDICT
from quantrouter.tools.compare import DEFAULT_NUM_PREDICT as COMPARE_NUM_PREDICT
from quantrouter.tools.compare import compare_variants, format_comparison, plot_comparison
from quantrouter.tools.errors import ToolError
from quantrouter.tools.ladder import OLLAMA_QUANTIZE_TARGETS, build_embedded_ladder, build_ladder, format_ladder
from quantrouter.tools.live import family_variants, read_backend
from quantrouter.tools.measure import DEFAULT_SEED
from quantrouter.tools.quality import evaluation_text
from quantrouter.tools.recommend import (
    Recommendation,
    offline_candidates,
    recommend_variant,
    variant_candidates,
)
from quantrouter.units import format_bytes

__all__ = ["add_tool_commands", "format_recommendation", "parse_count"]

EXIT_OK, EXIT_FAILED = 0, 1
DEFAULT_CONTEXT = 4096
DEFAULT_CALIBRATION_FILE = Path("quantrouter-calibration.json")
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([KMBT]?)\s*$", re.IGNORECASE)
_COUNT_UNITS = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}

Handler = Callable[[argparse.Namespace, Settings], int]


def parse_count(text: str) -> int:
    """'7B', '8.03B', '270M', '8030261248' → a parameter count."""
    match = _COUNT.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count; write e.g. 7B, 270M or 8030261248")
    return int(float(match.group(1)) * _COUNT_UNITS[match.group(2).upper()])


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _quant_list(text: str) -> tuple[str, ...]:
    return tuple(q.strip() for q in text.split(",") if q.strip())


def _reported(command: str, handler: Handler) -> Handler:
    """Turn the errors a person can act on into one line on stderr and exit status 1."""
    @functools.wraps(handler)
    def run(args: argparse.Namespace, settings: Settings) -> int:
        try:
            return handler(args, settings)
        except (ToolError, QuantrouterError, CalibrationError, OSError) as error:
            print(f"quantrouter {command}: {error}", file=sys.stderr)
            return EXIT_FAILED
    return run


def _print(result: Any, text: str, as_json: bool) -> None:
    print(json.dumps(asdict(result), indent=2, default=str) if as_json else text)


def _backend_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ollama-host", dest="ollama_host",
                        help="the backend: Ollama or `quantrouter embedded serve` (default: settings, $OLLAMA_HOST "
                             "or http://127.0.0.1:11434)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def add_tool_commands(subparsers: Any) -> None:
    """Register `recommend`, `compare`, `calibrate` and `ladder` on the quantrouter CLI's subparsers."""
    rec = subparsers.add_parser(
        "recommend", help="which quantization fits a memory budget, and why",
        description="Offline (--vram and --params): every quant type with its weights (parameters × bits/weight), "
                    "KV cache for the context, total, whether it fits, its quality prior, and the pick. Live "
                    "(FAMILY): the backend's real variants against the memory free now. Both show where the "
                    "common rule 'GB per billion parameters × 1.2' would have answered otherwise.",
        epilog="Examples: quantrouter recommend --vram 8GiB --params 8.03B --context 8192 --layers 32 --kv-heads 8 "
               "--head-dim 128;  quantrouter recommend gemma3:270m --vram 1GiB")
    rec.add_argument("family", nargs="?", default="", help="a family the backend holds (live mode)")
    rec.add_argument("--vram", type=_size,
                     help="memory budget, e.g. 8GiB (offline: required; live: the capacity when NVML is absent)")
    rec.add_argument("--params", type=parse_count, help="parameter count, e.g. 7B (offline mode)")
    rec.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                     help=f"context tokens the KV cache must hold (default {DEFAULT_CONTEXT})")
    arch = rec.add_argument_group("architecture (offline; all three make the KV cache exact, else it is estimated)")
    arch.add_argument("--layers", type=int, help="block_count")
    arch.add_argument("--kv-heads", type=int, help="attention.head_count_kv")
    arch.add_argument("--head-dim", type=int, help="attention.key_length (embedding_length / head_count)")
    rec.add_argument("--reserve", dest="memory_reserve", type=_size,
                     help="memory the backend keeps back (default: settings.memory_reserve, Ollama's 457 MiB)")
    rec.add_argument("--target", help="a running router to read the free memory from (live mode)")
    _backend_flag(rec)
    rec.set_defaults(func=_reported("recommend", _recommend))

    cmp = subparsers.add_parser(
        "compare", help="run one prompt greedily on each variant: speed, load time, agreement",
        description="Runs the same prompt (temperature 0, fixed seed) on each variant of FAMILY, straight on the "
                    "backend, and prints decode and prompt tokens/sec, time to first token, cold load time, the "
                    "start of each answer, and agreement with the highest-precision variant (always run as the "
                    "reference): the share of its greedy tokens reproduced before the first divergence, and the "
                    "top-5 overlap from logprobs where the backend returns them.")
    cmp.add_argument("family", help="a family (gemma3:270m), an alias or one of its tags")
    cmp.add_argument("--prompt", required=True, help="the prompt")
    cmp.add_argument("--quants", type=_quant_list, default=(), help="only these levels, e.g. q4_K_M,q8_0")
    cmp.add_argument("--num-predict", type=int, default=COMPARE_NUM_PREDICT,
                     help=f"tokens per answer (default {COMPARE_NUM_PREDICT})")
    cmp.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"sampling seed (default {DEFAULT_SEED})")
    cmp.add_argument("--no-unload", action="store_true",
                     help="keep loaded variants loaded (load time then reads ≈0 for them)")
    cmp.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw speed against agreement (matplotlib)")
    _backend_flag(cmp)
    cmp.set_defaults(func=_reported("compare", _compare))

    cal = subparsers.add_parser(
        "calibrate", help="measure every variant of a family and write a calibration file for `serve`",
        description=f"Runs {len(CALIBRATION_PROMPTS)} built-in prompts on each variant (cold load first) and writes "
                    "measured decode and prompt tokens/sec, load time and agreement with the highest-precision "
                    "variant. `quantrouter serve --calibration FILE` starts the router from these figures, so its "
                    "first requests are routed on measurements instead of priors.")
    cal.add_argument("family", help="a family, an alias or one of its tags")
    cal.add_argument("--output", "-o", type=Path, default=DEFAULT_CALIBRATION_FILE,
                     help=f"where to write (default {DEFAULT_CALIBRATION_FILE})")
    cal.add_argument("--quants", type=_quant_list, default=(), help="only these levels (plus the reference)")
    cal.add_argument("--num-predict", type=int, default=CALIBRATION_NUM_PREDICT,
                     help=f"tokens per prompt (default {CALIBRATION_NUM_PREDICT})")
    cal.add_argument("--quality", action="store_true",
                     help="also measure each variant's quality against the highest-precision one on the shipped "
                          "evaluation text: mean KL divergence, top-token agreement and perplexity ratio, as "
                          "llama.cpp's perplexity tool reports them. Exact with --embedded (llama.cpp's logits); "
                          "against Ollama an approximation from its top-20 logprobs")
    cal.add_argument("--embedded", action="store_const", const=True, default=None,
                     help="start the embedded llama.cpp backend in-process (ladder under --cache-dir) and measure it")
    cal.add_argument("--cache-dir", dest="cache_dir", help="where the embedded ladder is (default: settings)")
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    _backend_flag(cal)
    cal.set_defaults(func=_reported("calibrate", _calibrate))

    targets = ", ".join(q.name for q in OLLAMA_QUANTIZE_TARGETS)
    lad = subparsers.add_parser(
        "ladder", help="create the quantized variants of an F16/BF16 model",
        description=f"Creates {targets} from SOURCE_TAG through Ollama's create API (`quantize`), named "
                    "<family>-<quant> so they join the source's family. Ollama quantizes only from F16, BF16 or F32 "
                    "and only to those three; other levels are published as tags to pull. With --embedded, builds "
                    "the embedded backend's full llama.cpp ladder (F16 … Q2_K) instead.")
    lad.add_argument("source", nargs="?", default="", help="an F16/BF16/F32 tag, e.g. llama3.2:3b-instruct-fp16")
    lad.add_argument("--quants", type=_quant_list, default=(), help=f"only these of {targets}")
    lad.add_argument("--force", action="store_true", help="re-create targets that already exist")
    lad.add_argument("--embedded", action="store_const", const=True, default=None,
                     help="build the embedded backend's ladder under --cache-dir (no backend needed)")
    lad.add_argument("--cache-dir", dest="cache_dir", help="where the embedded ladder is built (default: settings)")
    lad.add_argument("--quiet", action="store_true", help="no progress bars")
    _backend_flag(lad)
    lad.set_defaults(func=_reported("ladder", _ladder))


def format_recommendation(r: Recommendation) -> str:
    """The table `recommend` prints: every candidate, the pick and where the rule of thumb disagrees."""
    lines = [f"budget {format_bytes(r.budget_bytes)} − reserve {format_bytes(r.reserve_bytes)} = "
             f"{format_bytes(r.available_bytes)} available; KV cache (f16) for {r.context} tokens",
             f"  {'variant':<24} {'bpw':>6} {'weights':>10} {'KV':>11} {'total':>10} {'fits':>4} {'quality':>7} "
             f"{'rule ×1.2':>10} {'rule':>4}"]
    for e in r.estimates:
        c = e.candidate
        kv = format_bytes(c.kv_bytes) + ("~" if c.kv_estimated else " ")
        lines.append(f"  {c.label:<24} {c.quant.bits_per_weight:>6.2f} {format_bytes(c.weights_bytes):>10} "
                     f"{kv:>11} {format_bytes(e.total_bytes):>10} {'yes' if e.fits else 'no':>4} "
                     f"{e.quality:>7.3f} {format_bytes(e.rule_bytes):>10} {'yes' if e.rule_fits else 'no':>4}")
    if any(e.candidate.kv_estimated for e in r.estimates):
        lines.append("  ~ KV estimated from the parameter count "
                     "(give --layers, --kv-heads, --head-dim to make it exact)")
    lines.append(f"→ {r.reason}")
    if r.disagreements:
        lines.append("where the rule of thumb (GB per billion parameters × 1.2) says otherwise:")
        lines += [f"  - {note}" for note in r.disagreements]
    return "\n".join(lines)


def _architecture(args: argparse.Namespace) -> Architecture | None:
    given = (args.layers, args.kv_heads, args.head_dim)
    if all(given):
        return Architecture("given", args.layers, args.kv_heads, args.head_dim, 0)
    if any(given):
        raise ToolError("--layers, --kv-heads and --head-dim go together: give all three or none")
    return None


def _memory_from_router(target: str, family: str) -> tuple[int, int]:
    with RouterClient(target) as client:
        listing = client.list_variants(family)
    return listing.free_bytes, listing.total_bytes


def _recommend(args: argparse.Namespace, settings: Settings) -> int:
    reserve = settings.memory.reserve
    if args.params is not None:
        if args.vram is None:
            raise ToolError("offline mode needs --vram with --params (e.g. --vram 8GiB --params 7B)")
        candidates = offline_candidates(args.params, args.context, _architecture(args))
        result = recommend_variant(candidates, args.vram, reserve, args.context)
    elif args.family:
        view = asyncio.run(read_backend(settings, capacity_bytes=args.vram or 0))
        family, variants = family_variants(view.catalog, args.family)
        free, total = (_memory_from_router(args.target, family) if args.target
                       else (view.memory.free_bytes, view.memory.total_bytes))
        if total == 0:
            raise ToolError("no free-memory figure: NVML is unavailable here and no capacity is configured; "
                            "pass --vram SIZE, set QUANTROUTER_MEMORY_CAPACITY, or read it from a router with --target")
        # The family's own resident variants give their memory back when the router swaps one for another.
        reclaimable = sum(v.vram_bytes for v in variants if v.resident)
        budget = min(total, free + reclaimable)
        result = recommend_variant(variant_candidates(variants, args.context), budget, reserve, args.context)
    else:
        raise ToolError("give a FAMILY (live) or --vram and --params (offline); see --help")
    _print(result, format_recommendation(result), args.json)
    return EXIT_OK


def _compare(args: argparse.Namespace, settings: Settings) -> int:
    result = asyncio.run(compare_variants(settings, args.family, args.prompt, args.quants, num_predict=args.num_predict,
                                          seed=args.seed, unload=not args.no_unload))
    _print(result, format_comparison(result), args.json)
    if args.plot is not None:
        plot_comparison(result, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return EXIT_OK


def _calibrate(args: argparse.Namespace, settings: Settings) -> int:
    bars: list[Any] = []
    progress = None if args.quiet else functools.partial(_quality_bar, bars)
    text = evaluation_text() if args.quality else None
    try:
        if settings.embedded.enabled:
            from quantrouter.embedded import EmbeddedConfig, run_embedded_in_thread

            config = EmbeddedConfig(cache_dir=settings.embedded.cache_dir,
                                    memory_budget_bytes=settings.embedded.memory_budget)
            with run_embedded_in_thread(config) as backend:
                files = {entry.name: entry.path for entry in backend.registry}
                result = asyncio.run(calibrate_family(settings, args.family, args.output, args.quants,
                                                      num_predict=args.num_predict, host=backend.url, quality=text,
                                                      gguf_files=files, progress=progress))
        else:
            result = asyncio.run(calibrate_family(settings, args.family, args.output, args.quants,
                                                  num_predict=args.num_predict, quality=text, progress=progress))
    finally:
        for bar in bars:
            bar.close()
    _print(result, format_calibration(result), args.json)
    return EXIT_OK


def _quality_bar(bars: list[Any], steps: int) -> Callable[[str], None]:
    """A tqdm bar over the quality run's steps (one per variant and evaluation entry)."""
    try:
        from tqdm import tqdm
    except ImportError:
        raise ToolError("progress bars need tqdm (pip install tqdm); or pass --quiet") from None
    bar = tqdm(total=steps, desc="quality", unit="text", leave=True)
    bars.append(bar)

    def step(tag: str) -> None:
        bar.set_postfix_str(tag, refresh=False)
        bar.update()
    return step


def _ladder(args: argparse.Namespace, settings: Settings) -> int:
    if settings.embedded.enabled:
        result = build_embedded_ladder(settings.embedded.cache_dir, progress=not args.quiet)
    elif not args.source:
        raise ToolError("give the SOURCE_TAG to quantize (an F16/BF16/F32 tag), or --embedded")
    else:
        result = asyncio.run(build_ladder(settings, args.source, args.quants, force=args.force,
                                          progress=not args.quiet))
    _print(result, format_ladder(result), args.json)
    return EXIT_OK
