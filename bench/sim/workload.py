"""Request traces and other tenants' memory use: generated once per (scenario, seed), replayed for every policy.

Common random numbers: the per-request speed noise is drawn into the trace, so two policies that send the same
request to the same variant under the same load see the same speed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from quantrouter.quant import QuantType, parse_quantization
from quantrouter.values import Preference

# Run-to-run spread of a request's decode speed (lognormal σ). llama-bench reports ± a few percent per run.
SPEED_NOISE_SIGMA = 0.05


@dataclass(frozen=True, slots=True)
class RequestClass:
    """One kind of caller: its preference, how much it sends and reads, and its SLO."""

    preference: Preference
    share: float
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    deadline_s: float
    min_tokens_per_second: float
    min_quantization: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """One request; `load_noise` is a standard normal draw that scales the load it triggers (engine jitter)."""

    id: int
    arrival: float
    preference: Preference
    prompt_tokens: int
    output_tokens: int
    deadline_s: float
    min_tokens_per_second: float
    speed_noise: float
    load_noise: float = 0.0
    min_quantization: str | None = None


@dataclass(frozen=True, slots=True)
class Phase:
    """Arrivals at `rate` requests/s from `start` (seconds) until the next phase."""

    start: float
    rate: float


@dataclass(frozen=True, slots=True)
class TenantProfile:
    """Other processes' GPU memory: a random walk between `low` and `high`, a new level every `period` s."""

    low: int
    high: int
    period: tuple[float, float]


def interactive_mix(slo_scale: float, tps_scale: float) -> tuple[RequestClass, ...]:
    """Chat-like callers: latency-sensitive short answers, balanced mid-size ones, long quality-first reports.

    The shares, lengths and SLOs are assumptions (no measured trace is at hand): a 4 s deadline and 60 tok/s
    (faster than reading) for interactive answers, 10 s for mid-size ones, 30 s for long reports.
    `slo_scale` stretches deadlines and `tps_scale` lowers speed floors for bigger models.
    """
    return (
        RequestClass(Preference.LATENCY, 0.4, (100, 800), (32, 200), 4.0 * slo_scale, 60.0 * tps_scale),
        RequestClass(Preference.BALANCED, 0.4, (200, 2000), (100, 400), 10.0 * slo_scale, 30.0 * tps_scale),
        RequestClass(Preference.QUALITY, 0.2, (500, 4000), (200, 800), 30.0 * slo_scale, 0.0),
    )


def generate_requests(classes: tuple[RequestClass, ...], phases: tuple[Phase, ...], duration: float,
                      rng: random.Random) -> tuple[Request, ...]:
    """A Poisson stream whose rate follows `phases`, each request drawn from `classes` by share."""
    requests: list[Request] = []
    weights = [c.share for c in classes]
    t = 0.0
    while True:
        rate = max((p for p in phases if p.start <= t), key=lambda p: p.start).rate
        next_start = min((p.start for p in phases if p.start > t), default=math.inf)
        gap = rng.expovariate(rate)
        if t + gap >= next_start:
            t = next_start  # memoryless: restarting the draw at the phase change is exact
            continue
        t += gap
        if t >= duration:
            return tuple(requests)
        cls = rng.choices(classes, weights)[0]
        requests.append(Request(
            len(requests), t, cls.preference, rng.randint(*cls.prompt_tokens), rng.randint(*cls.output_tokens),
            cls.deadline_s, cls.min_tokens_per_second, math.exp(rng.gauss(0.0, SPEED_NOISE_SIGMA)),
            rng.gauss(0.0, 1.0), cls.min_quantization))


def generate_tenant(profile: TenantProfile, duration: float, rng: random.Random) -> tuple[tuple[float, int], ...]:
    """(time, bytes wanted) steps, starting at t = 0."""
    steps = [(0.0, rng.randint(profile.low, profile.high))]
    while steps[-1][0] < duration:
        t = steps[-1][0] + rng.uniform(*profile.period)
        level = steps[-1][1] + rng.randint(-(profile.high - profile.low) // 2, (profile.high - profile.low) // 2)
        steps.append((t, min(max(level, profile.low), profile.high)))
    return tuple(steps)


def meets_floor(request: Request, quant: QuantType) -> bool:
    """Whether `quant` honours the request's min_quantization (a violation fails the request)."""
    floor = request.min_quantization
    return floor is None or quant.quality >= parse_quantization(floor).quality


def with_squeeze(steps: tuple[tuple[float, int], ...], start: float, end: float,
                 level: int) -> tuple[tuple[float, int], ...]:
    """`steps` with another tenant wanting at least `level` bytes from `start` to `end` (a squeeze)."""
    times = sorted({t for t, _ in steps} | {start, end})
    out = []
    for t in times:
        base = max((want for s, want in steps if s <= t), default=0)
        out.append((t, max(base, level) if start <= t < end else base))
    return tuple(out)
