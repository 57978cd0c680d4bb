"""What each variant has really delivered: EWMAs of decode tok/s, prompt tok/s and cold-load time.

Before a variant's first sample the estimate is a prior. Decode is memory-bandwidth bound: a token costs
`W / (η·BW) + c` seconds (docs/quantization.md §2 and §6), the bytes read at the bandwidth achieved plus a fixed
overhead. With siblings of two sizes or more measured, the prior is the line through them (least squares), which
learns both terms on this GPU; with one, it scales by size (tok/s ∝ 1/bytes), which leaves the overhead out and
so flatters smaller variants (on the simulated H100, F16's 84 tok/s made Q8_0 a 158 tok/s prior where it runs at
113; the line through F16 and Q5_K_M said 117); with none, the model itself, at the GPU's rated bandwidth, gives a
first guess. Neither extrapolates
a gain below `SPEED_FLOOR_BPW`: there dequantisation eats the smaller read (Q2_K and Q3_K_S decode slower
than Q4_0 on an RTX 3090, docs/quantization.md §2), so a file below the floor counts as the size it would
have at the floor. Prompt processing is compute bound and roughly flat across quant types, so a sibling's
figure carries over unscaled.

A decode rate measured while other runners shared the GPU says little about the variant (runners time-slice one
GPU), so such a sample never moves an estimate. Sharing slows a request by at most the number of runners it
shared with, so the sample times that number bounds the variant's rate from above: a prior faster than the bound
falls to it (still a prior). A batch on the variant's own runner (OLLAMA_NUM_PARALLEL > 1) is what its requests
meet under load, and counts as the variant's rate. Started from the shared rate itself, a first sample taken
three ways time-sliced had kept Q4_K_M at 44 tok/s (141 true) in the simulator, below the latency callers' 60
tok/s floor, never to be sampled again; started from the bound instead, variants that never ran alone (a burst)
kept an estimate above their speed, and the simulated burst lost goodput.

A calibration file (`quantrouter calibrate`) seeds each variant with measured figures. Its ratios between variants
carry over; its level need not: the machine may run faster or slower than on the day it was made. Once a calibrated
variant has run, every calibrated sibling that has not run since is scaled by that variant's figures now ÷ its
calibrated ones: decode and prompt rates separately, load times as the file has them. Traced on the real-engine
replay (seed 4; the file then committed had been made on a busy machine and gave q4_0 8.5 tok/s, which ran at
14–23), a sibling otherwise kept its file's 5.8 tok/s, and QUALITY requests stayed on q4_0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from quantrouter.catalog import VariantInfo
from quantrouter.units import NS
from quantrouter.values import quick_constructor

__all__ = [
    "GPU_BANDWIDTH",
    "SPEED_FLOOR_BPW",
    "Observation",
    "SpeedEstimate",
    "ThroughputSnapshot",
    "ThroughputTable",
    "bandwidth_for",
    "decode_bytes",
]

# Bandwidth model constants (docs/quantization.md §6): η = achieved fraction of peak bandwidth,
# c = fixed per-token overhead (kernel launches, sampling).
BANDWIDTH_EFFICIENCY = 0.8
PER_TOKEN_OVERHEAD_S = 0.004
# With no GPU known (static source, CPU backends), a DDR-class figure keeps first guesses modest.
DEFAULT_BANDWIDTH = 50e9
# Prompt processing runs batched; with nothing measured assume it is this much faster than decode. On a GPU
# (its bandwidth known) batched prompt kernels gain far more: the lowest pp/tg ratio of docs/quantization.md §2
# is an RTX 3090's LLaMA 7B Q4_0, pp512 3408 vs tg128 121.82 tok/s (28×; an RTX 4090's Llama-3 8B Q4_K_M at
# depth 8192, 4040 vs 130.58, is 31×). At 10× a 20k-token prompt was expected to take 3× its real time, and the
# deadline refused the first long-prompt requests the engine would have served.
PROMPT_SPEEDUP_PRIOR = 10.0
GPU_PROMPT_SPEEDUP_PRIOR = 28.0
# Cold load ≈ reading the weights at disk/PCIe speed plus a fixed start-up cost.
LOAD_BYTES_PER_SECOND = 2e9
LOAD_FIXED_S = 0.2
# Bits per weight below which a smaller file decodes no faster (the Q4_K block is 4.5 bpw, quant.md §1d).
SPEED_FLOOR_BPW = 4.5

# Peak memory bandwidth, bytes/s, by a substring of the NVML device name (docs/quantization.md §6).
GPU_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("RTX 4090", 1.008e12),
    ("L4", 300e9),
)


def bandwidth_for(gpu_names: Iterable[str], configured: float = 0.0) -> float:
    """The configured bandwidth, else the first known GPU's, else the conservative default.

    Markers match whole words, so that an "L40S" is not taken for an "L4".
    """
    if configured > 0:
        return configured
    for name in gpu_names:
        for marker, bandwidth in GPU_BANDWIDTH:
            if re.search(rf"\b{re.escape(marker)}\b", name):
                return bandwidth
    return DEFAULT_BANDWIDTH


def decode_bytes(size_bytes: int, bits_per_weight: float) -> int:
    """The size a decode step costs like: the file's, or the size it would have at the speed floor."""
    return int(size_bytes * max(1.0, SPEED_FLOOR_BPW / bits_per_weight)) if bits_per_weight > 0 else size_bytes


@dataclass(frozen=True, slots=True)
class Observation:
    """The figures of one finished request, from Ollama's final chunk (durations in ns)."""

    eval_count: int = 0
    eval_duration_ns: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration_ns: int = 0
    load_duration_ns: int = 0
    cold: bool = False
    busy_runners: int = 1  # the most runners (this one included) serving requests on the GPU during its life


@dataclass(frozen=True, slots=True)
class SpeedEstimate:
    """What the policy uses for one variant; `measured` is False while it is a prior."""

    decode_tps: float
    prompt_tps: float
    load_seconds: float
    samples: int = 0
    measured: bool = False


_new_estimate = quick_constructor(SpeedEstimate)


@dataclass(frozen=True, slots=True)
class _Ewma:
    decode_tps: float | None = None
    prompt_tps: float | None = None
    load_seconds: float | None = None
    samples: int = 0
    ceiling: float | None = None  # the lowest bound on its solo decode rate that shared samples set
    calibrated: tuple[float, float] | None = None  # the calibration's decode and prompt tok/s it was seeded with
    live: int = 0  # decode samples since then (or since the start, unseeded)


_UNSEEN = _Ewma()
# A measured sibling whose figures seed another variant's priors: its EWMAs and its `decode_bytes`.
_Reference = tuple[_Ewma, int]
# Seconds per decoded token as a line in bytes read: (seconds per byte, seconds of fixed overhead).
_Line = tuple[float, float]


def _blend(old: float | None, new: float | None, alpha: float) -> float | None:
    if new is None:
        return old
    return new if old is None else alpha * new + (1 - alpha) * old


@dataclass(frozen=True, slots=True)
class ThroughputSnapshot:
    """An immutable view of the table that the policy reads; priors are computed here, purely."""

    stats: Mapping[str, _Ewma] = field(default_factory=dict)
    bandwidth: float = DEFAULT_BANDWIDTH

    def estimate(self, tag: str, size_bytes: int, siblings: Mapping[str, int]) -> SpeedEstimate:
        """The estimate for `tag`; `siblings` maps sibling tags to theirs. Sizes are `decode_bytes`."""
        measured, drift = self._measured({**siblings, tag: size_bytes})
        others = [t for t in measured if t[0] != tag]
        return self._estimate(tag, size_bytes, _most_sampled(others), _line(others), drift)

    def estimates(self, variants: Sequence[VariantInfo]) -> list[tuple[VariantInfo, SpeedEstimate]]:
        """Each variant of one family with its estimate, the others serving as siblings for the priors.

        The best-sampled sibling is found once for the family (and the runner-up for that sibling itself),
        not once per variant: per variant it made the router's per-request work quadratic in the family size.
        """
        sizes = {v.tag: decode_bytes(v.size_bytes, v.quant.bits_per_weight) for v in variants}
        measured, drift = self._measured(sizes)
        best = _most_sampled(measured)
        runner_up = _most_sampled(t for t in measured if t is not best) if best is not None else None
        line = _line(measured)  # only unmeasured variants use it, so each one's own point may stay in
        return [(v, self._estimate(v.tag, sizes[v.tag], runner_up if best is not None and best[0] == v.tag else best,
                                   line, drift))
                for v in variants]

    def _estimate(self, tag: str, size_bytes: int, sibling: tuple[str, _Ewma, int] | None,
                  line: _Line | None, drift: tuple[float, float] = (1.0, 1.0)) -> SpeedEstimate:
        own = _at_pace(self.stats.get(tag, _UNSEEN), drift)
        reference = None if sibling is None else sibling[1:]
        decode = own.decode_tps or self._decode_prior(size_bytes, reference, line)
        if own.decode_tps is None and own.ceiling is not None and own.ceiling < decode:
            decode = own.ceiling  # a prior that shared samples prove too fast
        prompt = own.prompt_tps or self._prompt_prior(decode, reference, self.bandwidth > DEFAULT_BANDWIDTH)
        load = own.load_seconds if own.load_seconds is not None else self._load_prior(size_bytes, reference)
        return _new_estimate(decode, prompt, load, own.samples, own.decode_tps is not None)

    def _measured(self, siblings: Mapping[str, int]) -> tuple[list[tuple[str, _Ewma, int]], tuple[float, float]]:
        """The siblings with a measured decode rate, in `siblings`' order, with their figures (calibrated ones at the
        GPU's pace now, `_drift`) and sizes; and that drift."""
        stats = self.stats
        measured = [(t, stats[t], size) for t, size in siblings.items()
                    if size > 0 and t in stats and stats[t].decode_tps is not None]
        drift = _drift(measured)
        return [(t, _at_pace(ewma, drift), size) for t, ewma, size in measured], drift

    def _decode_prior(self, size_bytes: int, reference: _Reference | None, line: _Line | None) -> float:
        if line is not None:
            return 1.0 / (line[0] * size_bytes + line[1])
        if reference is not None and reference[0].decode_tps is not None and size_bytes > 0:
            return reference[0].decode_tps * reference[1] / size_bytes
        seconds = size_bytes / (BANDWIDTH_EFFICIENCY * self.bandwidth) + PER_TOKEN_OVERHEAD_S
        return 1.0 / seconds

    @staticmethod
    def _prompt_prior(decode_tps: float, reference: _Reference | None, gpu: bool) -> float:
        if reference is not None and reference[0].prompt_tps is not None:
            return reference[0].prompt_tps
        return decode_tps * (GPU_PROMPT_SPEEDUP_PRIOR if gpu else PROMPT_SPEEDUP_PRIOR)

    @staticmethod
    def _load_prior(size_bytes: int, reference: _Reference | None) -> float:
        if reference is not None and reference[0].load_seconds is not None and reference[1] > 0:
            return reference[0].load_seconds * size_bytes / reference[1]
        return LOAD_FIXED_S + size_bytes / LOAD_BYTES_PER_SECOND


def _line(measured: Iterable[tuple[str, _Ewma, int]]) -> _Line | None:
    """Seconds per token against bytes read, (slope, intercept) by least squares through the measured siblings:
    none unless two sizes or more are measured and the line is a bandwidth and an overhead (slope > 0,
    intercept ≥ 0); noisier samples fall back to scaling by size."""
    points = [(size, 1.0 / ewma.decode_tps) for _, ewma, size in measured if ewma.decode_tps]
    if len({size for size, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in points)
             / sum((x - mean_x) ** 2 for x, _ in points))
    intercept = mean_y - slope * mean_x
    return (slope, intercept) if slope > 0 and intercept >= 0 else None


def _drift(measured: Iterable[tuple[str, _Ewma, int]]) -> tuple[float, float]:
    """How much faster (decode, prompt) the GPU runs now than when the calibration file was made: the ratio of
    live to calibrated figures of the calibrated sibling with the most live samples (1, 1 with none)."""
    runs = [ewma for _, ewma, _ in measured if ewma.calibrated is not None and ewma.calibrated[0] > 0 and ewma.live]
    if not runs:
        return 1.0, 1.0
    ewma = max(runs, key=lambda e: e.live)
    assert ewma.calibrated is not None and ewma.decode_tps is not None
    decode, prompt = ewma.calibrated
    return ewma.decode_tps / decode, (ewma.prompt_tps or prompt) / prompt if prompt > 0 else 1.0


def _at_pace(ewma: _Ewma, drift: tuple[float, float]) -> _Ewma:
    """A variant's calibrated figures times the drift while it has not run since (its own samples say more)."""
    if ewma.calibrated is None or ewma.live or drift == (1.0, 1.0) or ewma.decode_tps is None:
        return ewma
    prompt = ewma.prompt_tps * drift[1] if ewma.prompt_tps is not None else None
    return replace(ewma, decode_tps=ewma.decode_tps * drift[0], prompt_tps=prompt)


def _most_sampled(measured: Iterable[tuple[str, _Ewma, int]]) -> tuple[str, _Ewma, int] | None:
    """The sibling with the most samples, the first of equals (the priors follow the best-measured one)."""
    return max(measured, key=lambda sibling: sibling[1].samples, default=None)


class ThroughputTable:
    """The mutable table, fed by the service after every completed request (one event loop, no locks)."""

    def __init__(self, alpha: float, bandwidth: float = DEFAULT_BANDWIDTH) -> None:
        self._alpha = alpha
        self._stats: dict[str, _Ewma] = {}
        self.bandwidth = bandwidth
        self._snapshot: ThroughputSnapshot | None = None

    def observe(self, tag: str, observation: Observation) -> None:
        o = observation
        decode = (o.eval_count * NS / o.eval_duration_ns
                  if o.eval_count > 0 and o.eval_duration_ns > 0 else None)
        prompt = (o.prompt_eval_count * NS / o.prompt_eval_duration_ns
                  if o.prompt_eval_count > 0 and o.prompt_eval_duration_ns > 0 else None)
        load = o.load_duration_ns / NS if o.cold and o.load_duration_ns > 0 else None
        old = self._stats.get(tag, _UNSEEN)
        ceiling = old.ceiling
        if decode is not None and o.busy_runners > 1:
            bound = decode * o.busy_runners
            ceiling, decode = bound if ceiling is None else min(ceiling, bound), None
        self._snapshot = None
        self._stats[tag] = _Ewma(
            _blend(old.decode_tps, decode, self._alpha),
            _blend(old.prompt_tps, prompt, self._alpha),
            _blend(old.load_seconds, load, self._alpha),
            old.samples + (decode is not None),
            ceiling,
            old.calibrated,
            old.live + (decode is not None),
        )

    def seed(self, tag: str, decode_tps: float, prompt_tps: float, load_seconds: float, samples: int) -> None:
        """Start a variant from calibrated figures (`quantrouter calibrate`) instead of a prior."""
        self._snapshot = None
        self._stats[tag] = _Ewma(decode_tps, prompt_tps, load_seconds, samples, self._stats.get(tag, _UNSEEN).ceiling,
                                 (decode_tps, prompt_tps))

    def snapshot(self) -> ThroughputSnapshot:
        """The table as it stands; the same snapshot until the next observation (one per request otherwise)."""
        snapshot = self._snapshot
        if snapshot is None or snapshot.bandwidth != self.bandwidth:
            snapshot = self._snapshot = ThroughputSnapshot(dict(self._stats), self.bandwidth)
        return snapshot
