"""EWMA of what variants delivered, and the priors used before the first sample."""

from __future__ import annotations

import pytest

from quantrouter.catalog import VariantInfo
from quantrouter.quant import parse_quantization
from quantrouter.throughput import (
    DEFAULT_BANDWIDTH,
    Observation,
    ThroughputTable,
    bandwidth_for,
    decode_bytes,
)

ALPHA = 0.3
H100_SXM_BANDWIDTH = 3.35e12  # docs/quantization.md §6
# Llama-3.1-8B weight bytes (docs/quantization.md §6): Q4_K_M 4.92 GB, Q8_0 8.54 GB, F16 16.06 GB.
Q4, Q8, F16 = 4_920_000_000, 8_540_000_000, 16_060_000_000
SIZES = {"q4": Q4, "q8": Q8, "f16": F16}
SECOND_NS = 1_000_000_000


def _decode(tokens_per_second: float, tokens: int = 100) -> Observation:
    return Observation(eval_count=tokens, eval_duration_ns=int(tokens * SECOND_NS / tokens_per_second))


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ([100.0], 100.0),
        ([100.0, 200.0], 130.0),  # 0.3·200 + 0.7·100
        ([100.0, 200.0, 50.0], 106.0),  # 0.3·50 + 0.7·130
        ([80.0, 80.0, 80.0, 80.0], 80.0),
    ],
)
def test_decode_ewma(rates: list[float], expected: float) -> None:
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    for rate in rates:
        table.observe("q4", _decode(rate))
    estimate = table.snapshot().estimate("q4", Q4, SIZES)
    assert estimate.decode_tps == pytest.approx(expected)
    assert (estimate.samples, estimate.measured) == (len(rates), True)


def test_prompt_rate_and_cold_load_are_learned_separately() -> None:
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.observe("q4", Observation(100, SECOND_NS, prompt_eval_count=2000, prompt_eval_duration_ns=SECOND_NS // 2,
                                    load_duration_ns=3 * SECOND_NS, cold=True))
    # A warm request's load_duration is queueing, not loading: it must not move the load estimate.
    table.observe("q4", Observation(100, SECOND_NS, prompt_eval_count=1000, prompt_eval_duration_ns=SECOND_NS // 2,
                                    load_duration_ns=SECOND_NS // 10, cold=False))
    estimate = table.snapshot().estimate("q4", Q4, SIZES)
    assert estimate.prompt_tps == pytest.approx(0.3 * 2000 + 0.7 * 4000)
    assert estimate.load_seconds == pytest.approx(3.0)


@pytest.mark.parametrize(
    "observation",
    [Observation(), Observation(eval_count=10), Observation(eval_duration_ns=SECOND_NS),
     Observation(prompt_eval_count=100, prompt_eval_duration_ns=SECOND_NS)],
)
def test_an_observation_without_decode_figures_is_not_a_decode_sample(observation: Observation) -> None:
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.observe("q4", observation)
    estimate = table.snapshot().estimate("q4", Q4, SIZES)
    assert (estimate.samples, estimate.measured) == (0, False)
    assert estimate.decode_tps == pytest.approx(171.36, abs=0.01)  # the bandwidth prior, as below


@pytest.mark.parametrize(
    ("size", "bandwidth", "tokens_per_second", "prompt_tokens_per_second", "load_seconds"),
    [
        # decode 1 / (W / (0.8 · BW) + 4 ms), prompt 28 × that on a known GPU (10 × with none), load 0.2 s +
        # W / (2 GB/s), worked by hand:
        # H100 SXM Q4_K_M: 4.92 GB / 2.68 TB/s = 1.836 ms, + 4 ms → 171.36 tok/s; 0.2 + 2.46 = 2.66 s.
        (Q4, H100_SXM_BANDWIDTH, 171.36, 4798.0, 2.66),
        # H100 SXM F16: 16.06 GB / 2.68 TB/s = 5.993 ms, + 4 ms → 100.07 tok/s; 0.2 + 8.03 = 8.23 s.
        (F16, H100_SXM_BANDWIDTH, 100.07, 2802.0, 8.23),
        # RTX 4090 Q4_K_M: 4.92 GB / 0.8064 TB/s = 6.101 ms, + 4 ms → 99.00 tok/s.
        (Q4, 1.008e12, 99.00, 2772.0, 2.66),
        # No GPU known (50 GB/s): 4.92 GB / 40 GB/s = 123 ms, + 4 ms → 7.87 tok/s.
        (Q4, DEFAULT_BANDWIDTH, 7.87, 78.7, 2.66),
    ],
)
def test_bandwidth_prior_with_nothing_measured(size: int, bandwidth: float, tokens_per_second: float,
                                               prompt_tokens_per_second: float, load_seconds: float) -> None:
    estimate = ThroughputTable(ALPHA, bandwidth).snapshot().estimate("x", size, {"x": size})
    assert estimate.decode_tps == pytest.approx(tokens_per_second, abs=0.01)
    assert estimate.prompt_tps == pytest.approx(prompt_tokens_per_second, abs=0.1)
    assert estimate.load_seconds == pytest.approx(load_seconds)
    assert not estimate.measured


@pytest.mark.parametrize(
    ("tag", "decode", "load"),
    [
        # tok/s ∝ 1/bytes and load ∝ bytes, scaled from the measured Q4_K_M (120 tok/s, 3 s load):
        # Q8_0 120 × 4.92 / 8.54 = 69.13 tok/s, 3 × 8.54 / 4.92 = 5.207 s; F16 36.76 tok/s, 9.793 s.
        ("q8", 69.13, 5.207),
        ("f16", 36.76, 9.793),
    ],
)
def test_sibling_prior_scales_by_size(tag: str, decode: float, load: float) -> None:
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.observe("q4", Observation(120, SECOND_NS, 3000, SECOND_NS, 3 * SECOND_NS, cold=True))
    estimate = table.snapshot().estimate(tag, SIZES[tag], SIZES)
    assert estimate.decode_tps == pytest.approx(decode, abs=0.01)
    assert estimate.prompt_tps == pytest.approx(3000.0), "prompt processing is compute bound: carried over unscaled"
    assert estimate.load_seconds == pytest.approx(load, abs=0.001)
    assert not estimate.measured


def test_the_sibling_with_most_samples_is_the_reference() -> None:
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.observe("q8", _decode(50.0))
    for _ in range(3):
        table.observe("q4", _decode(120.0))
    estimate = table.snapshot().estimate("f16", F16, SIZES)
    assert estimate.decode_tps == pytest.approx(36.76, abs=0.01)  # q4's: 120 × 4.92 / 16.06, not q8's 50 × 8.54 / 16.06


def test_a_sibling_outside_the_family_is_not_used() -> None:
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.observe("other-family", _decode(999.0))
    # The bandwidth prior: 8.54 GB / 2.68 TB/s = 3.187 ms, + 4 ms → 139.15 tok/s.
    assert table.snapshot().estimate("q8", Q8, SIZES).decode_tps == pytest.approx(139.15, abs=0.01)


def test_seed_starts_a_variant_from_calibrated_figures() -> None:
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.seed("q4", 131.0, 7000.0, 4.5, samples=5)
    table.observe("q4", _decode(121.0))
    estimate = table.snapshot().estimate("q4", Q4, SIZES)
    assert estimate.decode_tps == pytest.approx(0.3 * 121 + 0.7 * 131)
    assert (estimate.prompt_tps, estimate.load_seconds, estimate.samples) == (7000.0, 4.5, 6)


def _prompt(tokens_per_second: float, tokens: int = 100) -> Observation:
    return Observation(eval_count=tokens, eval_duration_ns=int(tokens * SECOND_NS / 120.0), prompt_eval_count=tokens,
                       prompt_eval_duration_ns=int(tokens * SECOND_NS / tokens_per_second))


def test_calibrated_variants_not_run_since_follow_the_pace_a_calibrated_sibling_runs_at_now() -> None:
    """A calibration file made on a busier (or cooler) day says how the variants compare, not how fast the GPU is
    today: on the replay's machine q4_0 ran at 21 tok/s against the file's 8.5 while its siblings kept the file's
    5.8, and every QUALITY request stayed on q4_0. A variant that has run since keeps its own figures."""
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.seed("q4", 50.0, 1000.0, 4.0, samples=4)
    table.seed("q8", 25.0, 800.0, 6.0, samples=4)
    table.seed("f16", 10.0, 600.0, 9.0, samples=4)
    assert table.snapshot().estimate("q8", Q8, SIZES).decode_tps == 25.0  # nothing run yet: the file as it is
    table.observe("q4", _prompt(2000.0))  # q4 runs: decode 120 (EWMA 0.3·120 + 0.7·50 = 71), prompt 1300
    drift, prompt_drift = 71.0 / 50.0, 1300.0 / 1000.0
    q8 = table.snapshot().estimate("q8", Q8, SIZES)
    assert q8.decode_tps == pytest.approx(25.0 * drift)
    assert q8.prompt_tps == pytest.approx(800.0 * prompt_drift)
    assert q8.load_seconds == 6.0  # loads read the disk, whose pace the decode does not tell
    family = [VariantInfo(tag, "m", parse_quantization(quant), SIZES[tag])
              for tag, quant in (("q4", "Q4_K_M"), ("q8", "Q8_0"), ("f16", "F16"))]
    assert [e.decode_tps for _, e in table.snapshot().estimates(family)] == pytest.approx(
        [71.0, 25.0 * drift, 10.0 * drift])
    table.observe("q8", _decode(30.0))  # q8 has run since: its own EWMA, 0.3·30 + 0.7·25
    assert table.snapshot().estimate("q8", Q8, SIZES).decode_tps == pytest.approx(26.5)


def test_a_calibration_without_rates_sets_no_pace() -> None:
    """A file's variant with no decode or prompt rate (0: nothing measured) gives no drift, rather than a division
    by zero on every request."""
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.seed("q4", 0.0, 0.0, 4.0, samples=0)
    table.seed("q8", 25.0, 800.0, 6.0, samples=4)
    table.observe("q4", _prompt(2000.0))
    assert table.snapshot().estimate("q8", Q8, SIZES).decode_tps == 25.0
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.seed("q4", 50.0, 0.0, 4.0, samples=4)
    table.seed("q8", 25.0, 800.0, 6.0, samples=4)
    table.observe("q4", _prompt(2000.0))
    q8 = table.snapshot().estimate("q8", Q8, SIZES)
    assert (q8.decode_tps, q8.prompt_tps) == (pytest.approx(25.0 * 71.0 / 50.0), 800.0)


def test_a_snapshot_does_not_change_when_the_table_does() -> None:
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.observe("q4", _decode(100.0))
    snapshot = table.snapshot()
    table.observe("q4", _decode(200.0))
    assert snapshot.estimate("q4", Q4, SIZES).decode_tps == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("names", "configured", "bandwidth"),
    [
        (["NVIDIA H100 80GB HBM3"], 0.0, 3.35e12),
        (["NVIDIA H100 PCIe"], 0.0, 2.0e12),
        (["NVIDIA H100 NVL"], 0.0, 3.9e12),
        (["NVIDIA H200"], 0.0, 4.8e12),
        (["NVIDIA A100-SXM4-80GB"], 0.0, 2.039e12),
        (["NVIDIA A100-SXM4-40GB"], 0.0, 1.555e12),
        (["NVIDIA GeForce RTX 4090"], 0.0, 1.008e12),
        (["NVIDIA L4"], 0.0, 300e9),
        # An L40S is not an L4: a GPU the table does not know gets the conservative default.
        (["NVIDIA L40S"], 0.0, DEFAULT_BANDWIDTH),
        (["NVIDIA L40"], 0.0, DEFAULT_BANDWIDTH),
        (["NVIDIA GeForce RTX 3060", "NVIDIA GeForce RTX 4090"], 0.0, 1.008e12),
        ([], 0.0, DEFAULT_BANDWIDTH),
        (["NVIDIA H100 80GB HBM3"], 1.5e12, 1.5e12),
    ],
)
def test_bandwidth_for_gpu_names(names: list[str], configured: float, bandwidth: float) -> None:
    assert bandwidth_for(names, configured) == bandwidth


@pytest.mark.parametrize(
    ("quant", "size", "expected"),
    [
        ("Q4_K_M", 4_920_000_000, 4_920_000_000),  # 4.89 bpw: above the floor, its own size
        ("Q3_K_M", 4_000_000_000, 4_500_000_000),  # 4.0 bpw costs like a 4.5-bpw file: × 4.5 / 4.0
        ("Q2_K", 3_180_000_000, 4_529_484_379),  # 3.1593 bpw: × 4.5 / 3.1593
    ],
)
def test_no_speed_gain_is_extrapolated_below_the_floor(quant: str, size: int, expected: int) -> None:
    assert decode_bytes(size, parse_quantization(quant).bits_per_weight) == expected


def test_a_sub_floor_sibling_is_predicted_no_faster_than_the_floor_allows() -> None:
    """Scaled from a measured Q4_K_M, Q2_K's prior is what a 4.5-bpw file of its parameters would decode at."""
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    table.observe("q4", _decode(120.0))
    variants = [VariantInfo("q4", "f", parse_quantization("Q4_K_M"), Q4),
                VariantInfo("q2", "f", parse_quantization("Q2_K"), 3_180_000_000)]
    estimates = {v.tag: e for v, e in table.snapshot().estimates(variants)}
    # 120 × 4.92 GB / 4.5295 GB (Q2_K's 3.18 GB at 4.5 bpw) = 130.35 tok/s, not 120 × 4.92 / 3.18 = 185.66.
    assert estimates["q2"].decode_tps == pytest.approx(130.35, abs=0.01)


@pytest.mark.parametrize(("runners", "bound"), [
    (2, 100.0),  # 50 tok/s time-sliced 2 ways: at most 2 × as fast alone, below the prior
    (4, 200.0),  # above the prior: the prior stands
])
def test_a_sample_taken_while_other_runners_shared_the_gpu_only_caps_a_prior(runners: int, bound: float) -> None:
    """Time-slicing slows a request by at most the runners it shared with, so such a sample bounds the variant's
    rate from above: a prior faster than the bound falls to it (still a prior), a slower one stands; a measured
    estimate ignores it."""
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    prior = table.snapshot().estimate("q4", Q4, SIZES).decode_tps
    shared = Observation(eval_count=100, eval_duration_ns=2 * SECOND_NS, busy_runners=runners)
    table.observe("q4", shared)
    capped = table.snapshot().estimate("q4", Q4, SIZES)
    assert (capped.decode_tps, capped.measured) == (pytest.approx(min(prior, bound)), False)
    table.observe("q4", _decode(120.0))
    table.observe("q4", shared)
    estimate = table.snapshot().estimate("q4", Q4, SIZES)
    assert (estimate.decode_tps, estimate.samples) == (pytest.approx(120.0), 1), "the shared sample did not move it"


def test_the_best_measured_sibling_seeds_the_priors_and_itself_follows_the_runner_up() -> None:
    """Prompt and load priors come from the sibling with the most samples, and that sibling's own missing figures
    from the next one; decode, with two sizes measured, from the line through them."""
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    for _ in range(3):
        table.observe("q8", _decode(90.0))  # decode only: its prompt rate must come from a sibling
    table.observe("q4", Observation(100, SECOND_NS, prompt_eval_count=4000, prompt_eval_duration_ns=SECOND_NS))
    variants = [VariantInfo(tag, "f", parse_quantization(quant), SIZES[tag])
                for tag, quant in (("f16", "F16"), ("q8", "Q8_0"), ("q4", "Q4_K_M"))]
    estimates = {v.tag: e for v, e in table.snapshot().estimates(variants)}
    # The line through q8 (8.54 GB, 1/90 s) and q4 (4.92 GB, 1/100 s): 0.3069 ms/GB + 8.490 ms, so 16.06 GB → 74.52
    # tok/s; its prompt rate the GPU's 28× prior on that, as q8, the most sampled, has none to carry over.
    assert estimates["f16"].decode_tps == pytest.approx(74.52, abs=0.01), "the line through q8 and q4"
    assert estimates["f16"].prompt_tps == pytest.approx(74.52 * 28, abs=0.3), "q8 has no prompt rate"
    assert estimates["q8"].prompt_tps == pytest.approx(4000.0), "q8 itself follows the runner-up, q4"
    assert estimates == {v.tag: table.snapshot().estimate(v.tag, v.size_bytes, SIZES) for v in variants}


@pytest.mark.parametrize(("measured", "expected"), [
    # One size measured: scaled by size, 140 × 4.92 / 8.54 = 80.66 tok/s (the overhead scaled with the bytes).
    ({"q4": 140.0}, 80.66),
    # q4 and f16 measured (the overhead of a token learned with the bandwidth): the line through 1/140 s at 4.92
    # GB and 1/60 s at 16.06 GB is 0.8549 ms/GB + 2.937 ms, so Q8_0 at 8.54 GB → 97.68 tok/s, not 80.66 from q4
    # nor 112.8 from f16 by size: the bandwidth model's W / (η·BW) + c (docs/quantization.md §2, §6).
    ({"q4": 140.0, "f16": 60.0}, 97.68),
    # F16 at 40 tok/s: the line would need a negative overhead (−0.74 ms), which no GPU has: noise; by size.
    ({"q4": 140.0, "f16": 40.0}, 80.66),
])
def test_with_two_sizes_measured_the_prior_is_the_line_through_them(measured: dict[str, float],
                                                                     expected: float) -> None:
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    for tag, rate in measured.items():
        table.observe(tag, _decode(rate))
        if tag == "q4":
            table.observe(tag, _decode(rate))  # q4 the most sampled, the reference for scaling by size
    estimate = table.snapshot().estimate("q8", Q8, SIZES)
    assert estimate.decode_tps == pytest.approx(expected, abs=0.01) and not estimate.measured


def test_a_snapshot_is_kept_until_the_next_observation_and_never_changes() -> None:
    table = ThroughputTable(ALPHA, H100_SXM_BANDWIDTH)
    before = table.snapshot()
    assert table.snapshot() is before, "no observation since: the same snapshot, not a copy per request"
    table.observe("q4", _decode(120.0))
    after = table.snapshot()
    assert after is not before
    assert after.estimate("q4", Q4, SIZES).measured
    assert not before.estimate("q4", Q4, SIZES).measured, "a snapshot already handed out does not move"
    table.seed("q8", 80.0, 2000.0, 3.0, samples=5)
    assert table.snapshot().estimate("q8", Q8, SIZES).decode_tps == 80.0
