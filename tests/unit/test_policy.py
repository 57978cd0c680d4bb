"""The routing decision, table-driven over the Llama-3.1-8B ladder on GPUs of 80, 24 and 8 GB."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from quantrouter.catalog import Architecture, VariantInfo
from quantrouter.policy import (
    LOAD_WINDOW_S,
    PRIOR_DEADLINE_SLACK,
    SHARING_LEVELS,
    CandidateInput,
    InFlight,
    MemoryView,
    PolicyConfig,
    RoutingRequest,
    decide,
    offered_load,
    remaining_seconds,
    runners_tolerated,
)
from quantrouter.quant import KV_CACHE_TYPES, parse_quantization
from quantrouter.throughput import ThroughputTable
from quantrouter.values import Assessment, Decision, FailureKind, Preference

GIB = 1 << 30
FAMILY = "llama3.1:8b-instruct"
# Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128; at num_ctx 4096 the f16 KV cache is 512 MiB
# (docs/quantization.md §3), so need(v) = size(v) + 0.5 GiB.
LLAMA_8B = Architecture("llama", block_count=32, head_count_kv=8, head_dim=128, context_length=131072)
KV_4096 = GIB // 2
# File sizes in GiB, llama.cpp perplexity README for LLaMA 3 8B (docs/quantization.md §1b).
LADDER_GIB = {"F16": 14.97, "Q8_0": 7.96, "Q6_K": 6.14, "Q5_K_M": 5.33, "Q4_K_M": 4.58, "Q2_K": 2.96}
# Ollama's per-GPU minimum reserve on CUDA, 457 MiB (docs/quantization.md §3).
RESERVE = 457 << 20
H100_SXM_BANDWIDTH = 3.35e12  # docs/quantization.md §6
# Measured decode tok/s of a setup where Q2_K's dequantisation makes it slower than Q4_K_M
# (docs/quantization.md §2 (iii): below ~3 bpw tg can drop).
MEASURED_TPS = {"F16": 55.0, "Q8_0": 95.0, "Q6_K": 110.0, "Q5_K_M": 118.0, "Q4_K_M": 130.0, "Q2_K": 100.0}
PROMPT_TPS = 5000.0
LOAD_SECONDS = 5.0


def tag(quant: str) -> str:
    return f"{FAMILY}-{quant.lower()}"


def size(quant: str) -> int:
    return int(LADDER_GIB[quant] * GIB)


def ladder(quants: Sequence[str] = tuple(LADDER_GIB), resident: Sequence[str] = (),
           tps: dict[str, float] | None = None, busy: Sequence[str] = ()) -> list[CandidateInput]:
    """The family as the router sees it: measured speeds from `tps`, else the bandwidth prior."""
    table = ThroughputTable(0.3, H100_SXM_BANDWIDTH)
    for quant, rate in (tps or {}).items():
        table.seed(tag(quant), rate, PROMPT_TPS, LOAD_SECONDS, samples=10)
    speeds = table.snapshot()
    sizes = {tag(q): size(q) for q in quants}
    candidates = []
    for quant in quants:
        is_resident = quant in resident
        variant = VariantInfo(tag(quant), FAMILY, parse_quantization(quant), size(quant), architecture=LLAMA_8B,
                              resident=is_resident, vram_bytes=size(quant) + KV_4096 if is_resident else 0)
        candidates.append(CandidateInput(variant, speeds.estimate(variant.tag, variant.size_bytes, sizes),
                                         variant.quant.quality, in_flight=int(quant in busy)))
    return candidates


def free(gib: float) -> MemoryView:
    """NVML's view of a GPU other processes share."""
    return MemoryView(int(gib * GIB), RESERVE, "nvml", shared=True)


def request(preference: Preference = Preference.BALANCED, **fields: Any) -> RoutingRequest:
    return replace(RoutingRequest(FAMILY, preference, prompt_tokens=500, num_predict=256), **fields)


def chosen(decision: Decision) -> str | None:
    return decision.chosen.quantization if decision.chosen else None


def assessment(decision: Decision, quant: str) -> Assessment:
    return next(a for a in decision.candidates if a.quantization == quant)


def rejection(decision: Decision, quant: str) -> str:
    return assessment(decision, quant).rejection


Q, B, L = Preference.QUALITY, Preference.BALANCED, Preference.LATENCY


@pytest.mark.parametrize(
    ("preference", "free_gib", "resident", "measured", "expected", "downgraded"),
    [
        # 80 GB H100, everything fits.
        (Q, 78.0, (), False, "F16", False),
        # Priors ∝ 1/size would make Q2_K the fastest, but below 4.5 bpw no gain is extrapolated and an
        # unmeasured sub-floor variant yields to the variants above the floor.
        (L, 78.0, (), False, "Q4_K_M", False),
        (L, 78.0, (), True, "Q4_K_M", False),  # measured: Q2_K is slower than Q4_K_M
        # Cold loads (5 s) dominate T, so BALANCED buys quality cheaply: Q5_K_M 0.962 beats Q4_K_M 0.960.
        (B, 78.0, (), True, "Q5_K_M", False),
        (Q, 78.0, ("Q8_0",), True, "F16", False),  # 78 GiB leaves F16 far beyond the margin
        (L, 78.0, ("Q8_0",), True, "Q8_0", False),  # resident: no 5 s cold load
        (B, 78.0, ("Q8_0",), True, "Q8_0", False),
        # 24 GB RTX 4090 (22 GiB free).
        (Q, 22.0, (), True, "F16", False),
        (L, 22.0, (), True, "Q4_K_M", False),
        # 8 GB card with 7.2 GiB free: Ollama loads within 80 % of 7.2 − 0.45 GiB = 5.40 GiB; Q5_K_M needs 5.83,
        # Q4_K_M 5.08: only Q4_K_M and below fit.
        (Q, 7.2, (), True, "Q4_K_M", True),
        (B, 7.2, (), True, "Q4_K_M", True),  # BALANCED too would have taken Q5_K_M
        (L, 7.2, (), True, "Q4_K_M", False),
        # Q8_0 resident fills the card: it stays (F16 would be preferred but cannot load: downgraded).
        (Q, 0.2, ("Q8_0",), True, "Q8_0", True),
        (L, 0.2, ("Q8_0",), True, "Q8_0", False),
    ],
)
def test_preference_over_memory_residency_and_speed(preference: Preference, free_gib: float,
                                                    resident: tuple[str, ...], measured: bool, expected: str,
                                                    downgraded: bool) -> None:
    decision = decide(request(preference), ladder(resident=resident, tps=MEASURED_TPS if measured else None),
                      free(free_gib))
    assert (chosen(decision), decision.downgraded) == (expected, downgraded)
    assert decision.failure is None
    assert len(decision.candidates) == len(LADDER_GIB)


@pytest.mark.parametrize("free_gib", [78.0, 22.0, 12.0, 9.0, 7.2])
@pytest.mark.parametrize("measured", [False, True])
def test_quality_never_picks_lower_quality_than_latency(free_gib: float, measured: bool) -> None:
    candidates = ladder(tps=MEASURED_TPS if measured else None)
    quality = decide(request(Q), candidates, free(free_gib)).chosen
    latency = decide(request(L), candidates, free(free_gib)).chosen
    assert quality is not None and latency is not None
    assert quality.quality >= latency.quality
    assert latency.expected_seconds <= quality.expected_seconds
    if free_gib >= 9.0:  # room for more than Q4_K_M: the two preferences really differ
        assert quality.quality > latency.quality


@pytest.mark.parametrize(
    ("weight", "expected"),
    # All resident, 100 tokens, no prompt: T = 100 / tok/s. Score = w·q/q_max + (1−w)·T_min/T, computed by hand:
    # w 0.5 → Q4_K_M 0.960 beats Q5_K_M 0.934; w 0.9 → Q8_0 0.954 beats Q6_K 0.948 and F16 0.942.
    [(0.0, "Q4_K_M"), (0.5, "Q4_K_M"), (0.9, "Q8_0"), (1.0, "F16")],
)
def test_balanced_weight_moves_the_choice_from_speed_to_quality(weight: float, expected: str) -> None:
    quants = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
    tps = {"F16": 50.0, "Q8_0": 90.0, "Q6_K": 100.0, "Q5_K_M": 110.0, "Q4_K_M": 120.0}
    decision = decide(request(B, prompt_tokens=0, num_predict=100), ladder(quants, resident=quants, tps=tps),
                      free(40.0), PolicyConfig(balanced_quality_weight=weight))
    assert chosen(decision) == expected
    assert decision.chosen is not None and decision.chosen.score == max(a.score for a in decision.candidates)


@pytest.mark.parametrize(
    ("fields", "expected", "rejected", "reason"),
    [
        ({"min_quantization": parse_quantization("Q8_0")}, "Q8_0", "Q6_K", "below min_quantization Q8_0"),
        ({"allowed_quantizations": frozenset({"Q8_0", "Q4_K_M"})}, "Q4_K_M", "Q6_K",
         "Q6_K is not among the allowed quantizations"),
        ({"min_tokens_per_second": 120.0}, "Q4_K_M", "Q5_K_M",
         "118.0 tok/s is below min_tokens_per_second 120"),
        # Cold loads: 5 s for every variant; only the resident Q6_K meets a 1 s time to first token.
        ({"max_time_to_first_token": 1.0}, "Q6_K", "Q4_K_M",
         "time to first token 5.10 s exceeds max_time_to_first_token 1.00 s"),
        # Q6_K resident: 0.1 s + 256/110 = 2.43 s; every other variant pays the 5 s load.
        ({"time_remaining": 3.0}, "Q6_K", "Q4_K_M", "expected 7.07 s exceeds the 3.00 s left before the deadline"),
        ({"excluded": frozenset({tag("Q6_K")})}, "Q4_K_M", "Q6_K", "failed before its first token on this request"),
    ],
)
def test_constraints_reject_with_their_reason(fields: dict[str, object], expected: str, rejected: str,
                                              reason: str) -> None:
    decision = decide(request(L, **fields), ladder(resident=("Q6_K",), tps=MEASURED_TPS), free(40.0))
    assert chosen(decision) == expected
    assert rejection(decision, rejected) == reason
    assert not decision.downgraded, "constraints are not memory pressure"


def test_excluded_tags_make_a_fallback_decision() -> None:
    decision = decide(request(Q, excluded=frozenset({tag("F16")})), ladder(tps=MEASURED_TPS), free(40.0))
    assert (chosen(decision), decision.fallback, decision.reason_code) == ("Q8_0", True, "fallback")
    assert decision.reason.startswith(f"fell back to {tag('Q8_0')} after {tag('F16')} failed")


def test_an_open_breaker_skips_the_variant() -> None:
    candidates = [replace(c, breaker_open=c.variant.quant.name == "F16") for c in ladder(tps=MEASURED_TPS)]
    decision = decide(request(Q), candidates, free(40.0))
    assert chosen(decision) == "Q8_0"
    assert rejection(decision, "F16") == "skipped for a cool-down after repeated failures"


@pytest.mark.parametrize(
    ("quants", "free_gib", "fields", "failure", "reason_code"),
    [
        # 2 GiB free on an 8 GB card: nothing fits, and nothing else stood in the way.
        (tuple(LADDER_GIB), 2.0, {}, FailureKind.MEMORY, "no_fit_memory"),
        # Q2_K fits memory but is below the floor; the others do not fit: constraints, not only memory.
        (tuple(LADDER_GIB), 4.0, {"min_quantization": parse_quantization("Q4_K_M")}, FailureKind.CONSTRAINTS,
         "no_fit_constraints"),
        (tuple(LADDER_GIB), 78.0, {"time_remaining": 0.5}, FailureKind.DEADLINE, "no_fit_deadline"),
        # The deadline and an explicit constraint together: FAILED_PRECONDITION, not DEADLINE_EXCEEDED.
        (tuple(LADDER_GIB), 78.0, {"time_remaining": 0.5, "allowed_quantizations": frozenset({"Q8_0"})},
         FailureKind.CONSTRAINTS, "no_fit_constraints"),
        ((), 78.0, {}, FailureKind.EMPTY, "no_fit_empty"),
        (tuple(LADDER_GIB), 78.0, {"pinned_tag": f"{FAMILY}-q3_k_m"}, FailureKind.EMPTY, "no_fit_empty"),
    ],
)
def test_failure_kinds(quants: tuple[str, ...], free_gib: float, fields: dict[str, object], failure: FailureKind,
                       reason_code: str) -> None:
    decision = decide(request(Q, **fields), ladder(quants, tps=MEASURED_TPS), free(free_gib))
    assert decision.chosen is None
    assert (decision.failure, decision.reason_code) == (failure, reason_code)
    assert all(a.rejection for a in decision.candidates)


def test_memory_rejection_names_the_need_and_the_free_memory() -> None:
    decision = decide(request(Q), ladder(tps=MEASURED_TPS), free(7.2))
    # F16 needs 14.97 + 0.5 GiB; 7.2 GiB − 457 MiB reserve leaves 6.75 GiB.
    why = "needs 15.5 GiB, 6.8 GiB free (Ollama loads within 80% of it)"
    assert rejection(decision, "F16") == why
    assert decision.reason.endswith(f"downgraded from {tag('F16')}, which {why}")


@pytest.mark.parametrize(
    ("load_fraction", "expected"),
    # Q8_0 needs 8.46 GiB; 10 GiB free − reserve = 9.55 GiB. Within 80 % (7.64) it does not fit: Ollama would
    # make the request wait for busy runners (docs/ollama.md §3). At 100 % it would.
    [(0.8, "Q6_K"), (1.0, "Q8_0")],
)
def test_fit_follows_ollamas_load_threshold(load_fraction: float, expected: str) -> None:
    decision = decide(request(Q), ladder(("Q8_0", "Q6_K", "Q4_K_M"), tps=MEASURED_TPS), free(10.0),
                      PolicyConfig(load_fraction=load_fraction))
    assert chosen(decision) == expected
    assert decision.downgraded is (expected != "Q8_0")


@pytest.mark.parametrize(
    ("kv_type", "need_gib", "expected"),
    # Q8_0 is 7.96 GiB; its KV cache at num_ctx 4096 is 0.5 GiB at f16, 34/32 B per element at q8_0, 18/32 at
    # q4_0 (reference/quant.md §3). 10.8 GiB free − reserve = 10.35 GiB; 80 % of it = 8.28 GiB.
    [("f16", 8.46, "Q6_K"), ("q8_0", 8.2256, "Q8_0"), ("q4_0", 8.1006, "Q8_0")],
)
def test_the_memory_estimate_follows_ollamas_kv_cache_type(kv_type: str, need_gib: float, expected: str) -> None:
    config = PolicyConfig(kv_bytes_per_element=KV_CACHE_TYPES[kv_type])
    decision = decide(request(Q), ladder(("Q8_0", "Q6_K", "Q4_K_M"), tps=MEASURED_TPS), free(10.8), config)
    assert chosen(decision) == expected
    q8 = assessment(decision, "Q8_0")
    assert q8.memory_bytes / GIB == pytest.approx(need_gib, abs=0.005)


@pytest.mark.parametrize(("parallel", "waits"), [(1, True), (2, False)])
def test_a_runner_queues_beyond_ollamas_num_parallel(parallel: int, waits: bool) -> None:
    """Q4_K_M's runner serves one request with 10 s of work left: with OLLAMA_NUM_PARALLEL 1 the next request
    waits for it, with 2 it joins the batch at once."""
    pool = [replace(c, queued_seconds=10.0) if c.variant.quant.name == "Q4_K_M" else c
            for c in ladder(("Q8_0", "Q4_K_M"), resident=("Q4_K_M",), tps=MEASURED_TPS, busy=("Q4_K_M",))]
    decision = decide(request(L), pool, free(40.0), PolicyConfig(runner_parallel=parallel))
    q4 = assessment(decision, "Q4_K_M")
    service = 500 / PROMPT_TPS + 256 / MEASURED_TPS["Q4_K_M"]
    assert q4.queue_seconds == pytest.approx(10.0 - service if waits else 0.0)


@pytest.mark.parametrize(("time_sliced", "other_runner"), [(False, "its service"), (True, "the whole wait")])
def test_a_queued_requests_wait_is_time_sliced_by_the_other_runners_where_the_fleet_says_so(
        time_sliced: bool, other_runner: str) -> None:
    """Q4_K_M's runner has 10 s of work ahead (one slot), and an F16 runner 20 s: the next Q4_K_M request waits the
    10 s, and F16 time-slices the GPU with it through `other_runner` (min(20, 10 + s) rather than min(20, s))."""
    pool = [replace(c, queued_seconds=10.0) if c.variant.quant.name == "Q4_K_M" else c
            for c in ladder(("F16", "Q4_K_M"), resident=("F16", "Q4_K_M"), tps=MEASURED_TPS, busy=("F16", "Q4_K_M"))]
    memory = replace(free(40.0), backlog=(10.0, 20.0))
    decision = decide(request(L), pool, memory, PolicyConfig(queue_wait_time_sliced=time_sliced))
    service = 500 / PROMPT_TPS + 256 / MEASURED_TPS["Q4_K_M"]
    expected = 10.0 + (10.0 + service if time_sliced else service)
    assert assessment(decision, "Q4_K_M").queue_seconds == pytest.approx(expected)


# Services alone (500 prompt tokens at 5000 tok/s, 256 decoded): Q8_0 0.1 + 256/95 s, Q4_K_M 0.1 + 256/130 s.
Q8_SERVICE, Q4_SERVICE = 0.1 + 256 / 95.0, 0.1 + 256 / 130.0


@pytest.mark.parametrize(("parallel", "f16_left", "expected", "q8_queue", "q4_queue"), [
    # One slot: the request waits for Q8_0's 6 s, so LATENCY time-slices the GPU on Q4_K_M's idle runner.
    (1, None, "Q4_K_M", 6.0, Q4_SERVICE),
    # A free slot: it decodes in Q8_0's batch, in the same steps as the request there (no second runner, nothing
    # time-sliced), while Q4_K_M's runner would time-slice with that request for all of its own service.
    (2, None, "Q8_0", 0.0, Q4_SERVICE),
    (4, None, "Q8_0", 0.0, Q4_SERVICE),
    # Another runner busy (F16, 1 s left) still time-slices with either.
    (2, 1.0, "Q8_0", 1.0, 1.0 + Q4_SERVICE),
])
def test_a_request_joining_a_runners_batch_is_not_delayed_by_its_batch_mates(
        parallel: int, f16_left: float | None, expected: str, q8_queue: float, q4_queue: float) -> None:
    """Q8_0's runner serves a QUALITY request with 6 s left; Q4_K_M is resident and idle."""
    quants = ("F16", "Q8_0", "Q4_K_M")
    busy = ("Q8_0",) if f16_left is None else ("Q8_0", "F16")
    left = {"Q8_0": 6.0, "F16": f16_left or 0.0}
    pool = [replace(c, queued_seconds=left[c.variant.quant.name]) if c.in_flight else c
            for c in ladder(quants, resident=quants, tps=MEASURED_TPS, busy=busy)]
    view = replace(free(40.0), backlog=tuple(sorted(left[q] for q in busy)))
    decision = decide(request(L), pool, view, PolicyConfig(runner_parallel=parallel))
    assert chosen(decision) == expected
    assert assessment(decision, "Q8_0").queue_seconds == pytest.approx(q8_queue)
    assert assessment(decision, "Q4_K_M").queue_seconds == pytest.approx(q4_queue)


@pytest.mark.parametrize(("busy", "max_loaded", "wait"), [
    (("F16", "Q8_0", "Q4_K_M"), 3, 3 * 10.0),  # three models held, all busy: the first drains in 10 s × 3 runners
    (("F16", "Q8_0"), 3, 0.0),  # Q4_K_M idle: Ollama evicts it and loads at once
    (("F16", "Q8_0", "Q4_K_M"), 4, 0.0),  # a slot is free
])
def test_a_new_variant_waits_for_a_slot_when_ollama_holds_its_most_models_all_busy(
        busy: tuple[str, ...], max_loaded: int, wait: float) -> None:
    """F16, Q8_0 and Q4_K_M resident with 10, 20 and 30 s of work each where busy; Q5_K_M is not loaded."""
    left = {"F16": 10.0, "Q8_0": 20.0, "Q4_K_M": 30.0}
    pool = [replace(c, queued_seconds=left[c.variant.quant.name]) if c.in_flight else c
            for c in ladder(("F16", "Q8_0", "Q5_K_M", "Q4_K_M"), resident=("F16", "Q8_0", "Q4_K_M"),
                            tps=MEASURED_TPS, busy=busy)]
    config = PolicyConfig(max_loaded=max_loaded)
    alone = decide(request(L), pool, free(40.0), replace(config, max_loaded=99))
    decision = decide(request(L), pool, free(40.0), config)
    q5, q5_alone = (assessment(d, "Q5_K_M") for d in (decision, alone))
    assert q5.queue_seconds == pytest.approx(q5_alone.queue_seconds + wait)


@pytest.mark.parametrize(("busy", "max_loaded", "churn"), [
    (("F16", "Q8_0"), 3, LOAD_SECONDS),  # Q4_K_M idle among three held: the load evicts it, its users reload
    (("F16", "Q8_0"), 4, 0.0),  # a slot is free: nothing evicted
    ((), 4, 0.0),
])
def test_a_load_that_takes_an_idle_siblings_place_among_ollamas_models_is_charged_and_held_back(
        busy: tuple[str, ...], max_loaded: int, churn: float) -> None:
    """F16, Q8_0 and Q4_K_M resident on a GPU no one else uses (memory is plenty); Q5_K_M is not loaded."""
    pool = ladder(("F16", "Q8_0", "Q5_K_M", "Q4_K_M"), resident=("F16", "Q8_0", "Q4_K_M"), tps=MEASURED_TPS,
                  busy=busy)
    decision = decide(request(Q), pool, replace(free(60.0), shared=False), PolicyConfig(max_loaded=max_loaded))
    q5 = assessment(decision, "Q5_K_M")
    assert q5.churn_seconds == pytest.approx(churn)
    assert ("takes an idle sibling's place" in q5.held_back) is bool(churn)


@pytest.mark.parametrize(("busy", "loading", "expected", "failure"), [
    (("Q4_K_M",), (), "Q4_K_M", None),  # loading for an earlier request: its memory is already gone from free
    ((), ("Q4_K_M",), "Q4_K_M", None),  # loading still, though the request that started it is gone
    ((), (), None, FailureKind.MEMORY),  # neither resident nor loading: it must fit what is free
])
def test_a_variant_still_loading_for_an_earlier_request_is_joined_not_refused(
        busy: tuple[str, ...], loading: tuple[str, ...], expected: str | None, failure: FailureKind | None) -> None:
    """Q4_K_M is loading but not resident yet (Ollama lists a runner only once loaded), with a request in flight
    or with the router remembering the load it started (`loading`): 3 GiB free is all that is left beside it,
    which no variant fits. The request joins the loading runner, with no second load in its time, rather than
    failing for memory."""
    pool = [replace(c, queued_seconds=20.0) if c.in_flight else c
            for c in ladder(("Q8_0", "Q4_K_M"), tps=MEASURED_TPS, busy=busy)]
    pool = [replace(c, loading=c.variant.quant.name in loading) for c in pool]
    decision = decide(request(Q), pool, free(3.0))
    assert (chosen(decision), decision.failure) == (expected, failure)
    if expected:
        q4 = assessment(decision, "Q4_K_M")
        assert q4.time_to_first_token == pytest.approx(q4.queue_seconds + 500 / PROMPT_TPS)
        assert "needs" in rejection(decision, "Q8_0")


@pytest.mark.parametrize(("load", "band", "expected"), [
    (0.2, 0.025, "F16"),  # quiet: the best quality, as ever
    (0.35, 0.025, "F16"),  # at quiet_load: still quiet (busy means above it)
    (0.8, 0.025, "Q8_0"),  # busy: Q8_0 (0.977) counts as F16's equal and is faster
    (0.8, 0.005, "F16"),  # busy, but the band no wider than the quiet one
])
def test_quality_takes_the_faster_of_a_wider_band_while_the_gpu_is_busy(load: float, band: float,
                                                                        expected: str) -> None:
    pool = ladder(("F16", "Q8_0", "Q4_K_M"), resident=("F16", "Q8_0", "Q4_K_M"), tps=MEASURED_TPS)
    memory = replace(free(40.0), offered_load=load)
    decision = decide(request(Q), pool, memory, PolicyConfig(busy_quality_tolerance=band))
    assert chosen(decision) == expected
    assert ("count as equal, so the faster" in decision.reason) is (expected == "Q8_0")


@pytest.mark.parametrize(("free_gib", "resident", "deadline", "expected", "sole"), [
    (12.0, (), 60.0, "Q4_K_M", True),  # Q8_0 fits alone, not beside Q4_K_M: the only runner, for every caller
    (12.0, (), None, "Q8_0", False),  # no deadline (batch work): QUALITY's own pick
    (12.0, ("Q4_K_M",), 60.0, "Q4_K_M", True),  # Q4_K_M loaded changes nothing: Q8_0 would evict it, then serve
    (40.0, (), 60.0, "F16", False),  # room for a sibling beside F16
])
def test_a_cold_load_that_would_leave_no_room_for_a_sibling_is_ranked_as_balanced(
        free_gib: float, resident: tuple[str, ...], deadline: float | None, expected: str, sole: bool) -> None:
    pool = ladder(("F16", "Q8_0", "Q4_K_M"), resident=resident, tps=MEASURED_TPS)
    decision = decide(request(Q, time_remaining=deadline), pool, free(free_gib))
    assert chosen(decision) == expected
    assert ("would be the family's only runner" in decision.reason) is sole
    alone = decide(request(Q, time_remaining=deadline), pool, free(free_gib),
                   PolicyConfig(sole_runner_as_balanced=False))
    assert chosen(alone) == ("Q8_0" if sole else expected)


@pytest.mark.parametrize(("preference", "quants", "free_gib", "expected", "own"), [
    (L, ("Q8_0", "Q4_K_M", "Q2_K"), 8.0, "Q4_K_M", "Q2_K"),  # LATENCY's Q2_K (measured quicker) would serve alone
    (L, ("Q8_0", "Q4_K_M", "Q2_K"), 20.0, "Q2_K", "Q2_K"),  # Q4_K_M fits beside it
    (Q, ("F16", "Q4_K_M", "Q2_K"), 25.0, "Q4_K_M", "F16"),  # beside F16 only Q2_K, kept for memory pressure
    (Q, ("F16", "Q4_K_M", "Q2_K"), 27.0, "F16", "F16"),  # Q4_K_M fits beside F16
])
def test_the_sole_runner_rule_holds_for_latency_too_and_counts_no_room_for_a_rung_below_the_speed_floor(
        preference: Preference, quants: tuple[str, ...], free_gib: float, expected: str, own: str) -> None:
    """On the real-engine replay, where the memory budget holds about one rung at a time, a LATENCY caller's Q4_0
    (3 % quicker than Q4_K_M, measured quality 0.70 against 0.95) and a QUALITY caller's F16 (room beside it for
    Q2_K only) each went on to serve every caller."""
    tps = {"F16": 55.0, "Q8_0": 95.0, "Q4_K_M": 130.0, "Q2_K": 134.0}
    pool = ladder(quants, tps=tps)
    decision = decide(request(preference, time_remaining=60.0), pool, free(free_gib))
    assert chosen(decision) == expected
    assert ("would be the family's only runner" in decision.reason) is (expected != own)
    alone = decide(request(preference, time_remaining=60.0), pool, free(free_gib),
                   PolicyConfig(sole_runner_as_balanced=False))
    assert chosen(alone) == own


def test_a_pinned_tag_is_served_even_when_memory_looks_short() -> None:
    decision = decide(request(L, pinned_tag=tag("F16")), ladder(tps=MEASURED_TPS), free(6.0))
    assert (chosen(decision), decision.pinned, decision.reason_code) == ("F16", True, "pinned")
    assert [a.quantization for a in decision.candidates] == ["F16"]


def test_pinned_tag_still_obeys_constraints() -> None:
    decision = decide(request(L, pinned_tag=tag("Q4_K_M"), min_quantization=parse_quantization("Q8_0")),
                      ladder(tps=MEASURED_TPS), free(40.0))
    assert decision.failure is FailureKind.CONSTRAINTS


@pytest.mark.parametrize(
    ("busy", "expected", "upgrade_feasible"),
    # Q4_K_M resident, 4 GiB free: with it reclaimable, 80 % of 4 − 0.45 + 5.08 GiB = 6.91 GiB; Q8_0's 8.46 does
    # not fit; Q5_K_M's 5.83 fits within 6.91 / 1.15 = 6.01, by evicting Q4_K_M (so it is held back, and Q4_K_M
    # serves). Busy, Q4_K_M cannot be given back: Q5_K_M does not fit at all.
    [((), "Q4_K_M", True), (("Q4_K_M",), "Q4_K_M", False)],
)
def test_only_idle_resident_siblings_count_as_reclaimable(busy: tuple[str, ...], expected: str,
                                                           upgrade_feasible: bool) -> None:
    candidates = ladder(("Q8_0", "Q5_K_M", "Q4_K_M"), resident=("Q4_K_M",), tps=MEASURED_TPS, busy=busy)
    decision = decide(request(Q), candidates, free(4.0))
    q5 = assessment(decision, "Q5_K_M")
    assert (chosen(decision), q5.feasible) == (expected, upgrade_feasible)
    assert decision.downgraded


@pytest.mark.parametrize(
    ("free_gib", "resident", "expected", "downgraded"),
    [
        # Q4_K_M resident (5.08 GiB, reclaimable). Q8_0 needs 8.46 GiB ≤ 80 % of the available memory, so it
        # fits from 10.58 GiB available (free 5.94); with the 15 % margin it replaces Q4_K_M from 12.16 (free 7.53).
        (6.5, ("Q4_K_M",), "Q4_K_M", True),  # available 11.13: fits, but inside the margin
        (7.4, ("Q4_K_M",), "Q4_K_M", True),  # available 12.03: still inside
        # Available 12.33: beyond the margin, feasible, but only by evicting Q4_K_M, so held back behind it.
        (7.7, ("Q4_K_M",), "Q4_K_M", False),
        # With nothing of the family resident there is nothing to thrash against: no margin.
        (11.0, (), "Q4_K_M", True),  # 80 % of 10.55 = 8.44 GiB < 8.46 needed
        (11.1, (), "Q8_0", False),
    ],
)
def test_upgrade_needs_the_hysteresis_margin(free_gib: float, resident: tuple[str, ...], expected: str,
                                             downgraded: bool) -> None:
    decision = decide(request(Q), ladder(("Q8_0", "Q4_K_M"), resident=resident, tps=MEASURED_TPS), free(free_gib))
    assert (chosen(decision), decision.downgraded) == (expected, downgraded)


def test_no_thrash_when_free_memory_hovers_at_the_boundary() -> None:
    """Free memory oscillating around Q8_0's raw need never flips a resident Q4_K_M to Q8_0 and back."""
    hovering = [5.5, 5.8, 6.0, 6.3, 6.6, 6.1, 5.7, 6.8, 5.9, 7.0]  # Q8_0 fits from 5.94 GiB free

    def picks(config: PolicyConfig) -> list[str]:
        resident, chosen_quants = "Q4_K_M", []
        for free_gib in hovering:
            decision = decide(request(Q), ladder(("Q8_0", "Q4_K_M"), resident=(resident,), tps=MEASURED_TPS),
                              free(free_gib), config)
            assert decision.chosen is not None
            resident = decision.chosen.quantization
            chosen_quants.append(resident)
        return chosen_quants

    assert set(picks(PolicyConfig())) == {"Q4_K_M"}

    def q8_feasible(config: PolicyConfig) -> list[bool]:
        return [next(a.feasible for a in decide(request(Q), ladder(("Q8_0", "Q4_K_M"), resident=("Q4_K_M",),
                                                                      tps=MEASURED_TPS), free(free_gib),
                                                  config).candidates if a.quantization == "Q8_0")
                for free_gib in hovering]

    assert not any(q8_feasible(PolicyConfig()))
    assert any(q8_feasible(PolicyConfig(upgrade_hysteresis=0.0))), "without the margin the boundary is crossed"


def test_a_resident_variant_stays_chosen_when_free_memory_drops() -> None:
    decision = decide(request(Q), ladder(("Q8_0", "Q4_K_M"), resident=("Q8_0",), tps=MEASURED_TPS), free(0.0))
    assert (chosen(decision), decision.downgraded) == ("Q8_0", False)


def test_unknown_architecture_assumes_a_tenth_more_for_the_kv_cache() -> None:
    candidates = [replace(c, variant=replace(c.variant, architecture=None)) for c in ladder(("Q4_K_M",))]
    decision = decide(request(Q), candidates, free(40.0))
    assert decision.chosen is not None
    assert decision.chosen.memory_bytes == int(size("Q4_K_M") * 1.1)


def test_expected_time_is_load_plus_prompt_plus_decode() -> None:
    decision = decide(request(Q, prompt_tokens=1000, num_predict=130), ladder(("Q4_K_M",), tps=MEASURED_TPS),
                      free(40.0))
    assert decision.chosen is not None
    assert decision.chosen.time_to_first_token == pytest.approx(LOAD_SECONDS + 1000 / PROMPT_TPS)
    assert decision.chosen.expected_seconds == pytest.approx(LOAD_SECONDS + 1000 / PROMPT_TPS + 1.0)
    assert decision.chosen.measured
    assert "130 tok/s" in decision.reason and "cold load" in decision.reason


def test_a_deadline_alone_reports_the_best_expected_time() -> None:
    decision = decide(request(Q, time_remaining=0.5), ladder(resident=("Q4_K_M",), tps=MEASURED_TPS), free(40.0))
    assert decision.failure is FailureKind.DEADLINE
    # Q4_K_M resident: 500 / 5000 + 256 / 130 = 2.07 s, the smallest of all.
    assert decision.best_expected_seconds == pytest.approx(0.1 + 256 / 130)


@pytest.mark.parametrize(("measured", "share", "refused"), [
    (True, 1.2, True),  # measured: past the deadline is a refusal
    (False, 1.2, False),  # on a prior, within the slack: tried, at risk
    (False, PRIOR_DEADLINE_SLACK * 1.2, True),  # on a prior, past the slack: a refusal
])
def test_a_prior_refuses_on_the_deadline_only_past_its_slack(measured: bool, share: float, refused: bool) -> None:
    """Q4_K_M alone and resident, its expected time `share` × the time left."""
    candidates = ladder(("Q4_K_M",), resident=("Q4_K_M",), tps=MEASURED_TPS if measured else None)
    alone = decide(request(Q), candidates, free(40.0)).chosen
    assert alone is not None and alone.measured is measured
    decision = decide(request(Q, time_remaining=alone.expected_seconds / share), candidates, free(40.0))
    assert (decision.failure is FailureKind.DEADLINE) is refused
    if not refused:
        assert decision.chosen is not None and decision.chosen.at_risk


@pytest.mark.parametrize(
    ("qualities", "tolerance", "expected"),
    [
        # Measured agreement on a requantised ladder: the rungs above Q4_K_M measure about the same.
        ({"F16": 0.950, "Q8_0": 0.949, "Q6_K": 0.948}, 0.005, "Q6_K"),  # all equal: the fastest of them
        ({"F16": 0.950, "Q8_0": 0.949, "Q6_K": 0.948}, 0.0, "F16"),  # no tolerance: the highest, however slight
        ({"F16": 0.950, "Q8_0": 0.944, "Q6_K": 0.940}, 0.005, "F16"),  # beyond the tolerance: quality decides
        ({"F16": 0.950, "Q8_0": 0.946, "Q6_K": 0.930}, 0.005, "Q8_0"),  # F16 and Q8_0 equal; Q8_0 is faster
    ],
)
def test_quality_takes_the_fastest_of_equal_qualities(qualities: dict[str, float], tolerance: float,
                                                       expected: str) -> None:
    quants = tuple(qualities)
    candidates = [replace(c, quality=qualities[c.variant.quant.name])
                  for c in ladder(quants, resident=quants, tps=MEASURED_TPS)]
    decision = decide(request(Q), candidates, free(40.0), PolicyConfig(quality_tolerance=tolerance))
    assert chosen(decision) == expected


def test_the_backlog_delays_every_candidate_by_what_it_overlaps() -> None:
    """Runners time-slice the GPU: each in-flight request delays this one by min(its remaining, this one's own)."""
    quants = ("F16", "Q4_K_M")
    # 5, 1 and 40 s left; the last one's deadline is 3 s away, when the router cancels it.
    backlog = remaining_seconds([(10.0, 0.5, None), (1.0, 0.0, 8.0), (40.0, 0.0, 3.0)])
    assert backlog == (1.0, 3.0, 5.0)
    view = replace(free(40.0), backlog=backlog)
    decision = decide(request(Q, prompt_tokens=0, num_predict=260), ladder(quants, resident=quants, tps=MEASURED_TPS),
                      view)
    by_quant = {a.quantization: a for a in decision.candidates}
    # Service: F16 260/55 = 4.73 s, Q4_K_M 260/130 = 2 s.
    assert by_quant["F16"].queue_seconds == pytest.approx(1.0 + 3.0 + 260 / 55)
    assert by_quant["Q4_K_M"].queue_seconds == pytest.approx(1.0 + 2 * 2.0)
    assert by_quant["F16"].expected_seconds == pytest.approx(260 / 55 + by_quant["F16"].queue_seconds)


@pytest.mark.parametrize(
    ("backlog", "expected", "at_risk"),
    [
        ((), "F16", ()),  # idle GPU: QUALITY gets F16
        # Three long requests ahead: F16 would take 4.65 + 3 × 4.65 = 18.6 s of a 12 s deadline, Q8_0
        # 2.7 + 8.1 = 10.8 s: QUALITY steps down to the best candidate expected in time.
        ((30.0, 30.0, 30.0), "Q8_0", ("F16",)),
        ((0.5,), "F16", ()),  # the backlog drains: back up
    ],
)
def test_quality_steps_down_while_a_backlog_would_break_the_deadline(backlog: tuple[float, ...], expected: str,
                                                                       at_risk: tuple[str, ...]) -> None:
    quants = ("F16", "Q8_0", "Q4_K_M")
    decision = decide(request(Q, prompt_tokens=0, num_predict=256, time_remaining=12.0),
                      ladder(quants, resident=quants, tps=MEASURED_TPS), replace(free(40.0), backlog=backlog))
    assert chosen(decision) == expected
    assert tuple(a.quantization for a in decision.candidates if a.at_risk) == at_risk
    assert all(a.feasible for a in decision.candidates), "the backlog steers; it never rejects"


def test_when_nothing_is_expected_in_time_the_fastest_is_tried() -> None:
    quants = ("F16", "Q8_0", "Q4_K_M")
    decision = decide(request(Q, prompt_tokens=0, num_predict=256, time_remaining=5.0),
                      ladder(quants, resident=quants, tps=MEASURED_TPS), replace(free(40.0), backlog=(60.0,) * 4))
    assert all(a.at_risk for a in decision.candidates)
    assert chosen(decision) == "Q4_K_M"


def test_a_load_that_evicts_an_idle_sibling_is_charged_its_reload() -> None:
    """Q8_0 resident and idle, 7.5 GiB free: Q6_K (6.64 GiB) only fits by evicting it, Q4_K_M (5.08) beside it."""
    candidates = ladder(("Q8_0", "Q6_K", "Q4_K_M"), resident=("Q8_0",), tps=MEASURED_TPS)
    decision = decide(request(L), candidates, free(7.5))
    by_quant = {a.quantization: a for a in decision.candidates}
    assert by_quant["Q6_K"].churn_seconds == pytest.approx(LOAD_SECONDS)
    assert by_quant["Q4_K_M"].churn_seconds == 0.0 and by_quant["Q8_0"].churn_seconds == 0.0


@pytest.mark.parametrize(
    ("tps", "free_gib", "expected"),
    [
        (None, 78.0, "Q4_K_M"),  # priors: held back
        ({**MEASURED_TPS, "Q2_K": 100.0}, 78.0, "Q4_K_M"),  # measured slower than Q4_K_M: held back
        ({**MEASURED_TPS, "Q2_K": 200.0}, 78.0, "Q2_K"),  # measured faster (some GPU where it is): it may win
        (None, 4.9, "Q2_K"),  # memory leaves nothing else (Q2_K needs 3.46 GiB of 3.56 usable): it serves
    ],
)
def test_sub_floor_variants_win_only_when_memory_or_their_measured_speed_says(
        tps: dict[str, float] | None, free_gib: float, expected: str) -> None:
    decision = decide(request(L), ladder(tps=tps), free(free_gib))
    assert chosen(decision) == expected


@pytest.mark.parametrize(("time_remaining", "expected"), [(None, "Q4_K_M"), (30.0, "F16"), (5.0, "Q6_K")])
def test_balanced_takes_quality_when_the_deadline_leaves_room(time_remaining: float | None, expected: str) -> None:
    """All resident, 256 tokens: F16 4.65 s, Q6_K 2.33 s, Q4_K_M 1.97 s. On a quiet GPU, within half the time
    left, faster is not better, so quality decides among those; beyond it the usual balance applies."""
    quants = ("F16", "Q6_K", "Q4_K_M")
    candidates = ladder(quants, resident=quants, tps=MEASURED_TPS)
    decision = decide(request(B, prompt_tokens=0, time_remaining=time_remaining), candidates, free(40.0))
    assert chosen(decision) == expected
    busy = decide(request(B, prompt_tokens=0, time_remaining=time_remaining), candidates,
                  replace(free(40.0), offered_load=0.5))
    assert chosen(busy) == "Q4_K_M", "beyond the quiet load: the usual balance, whatever the deadline"



def test_a_speed_floor_is_judged_at_the_rate_other_runners_leave() -> None:
    """Q4_K_M is busy: a second runner (Q8_0) would time-slice the GPU with it and decode at 95 / 2 tok/s, below
    the 60 tok/s floor, while joining Q4_K_M's queue delays the request but leaves its rate whole."""
    candidates = ladder(("Q8_0", "Q4_K_M"), resident=("Q8_0", "Q4_K_M"), tps=MEASURED_TPS, busy=("Q4_K_M",))
    decision = decide(request(Q, min_tokens_per_second=60.0), candidates, replace(free(40.0), backlog=(2.0,)))
    assert chosen(decision) == "Q4_K_M"
    assert [a.quantization for a in decision.candidates if a.at_risk] == ["Q8_0"]
    idle = decide(request(Q, min_tokens_per_second=60.0), ladder(("Q8_0", "Q4_K_M"), resident=("Q8_0", "Q4_K_M"),
                                                                 tps=MEASURED_TPS), free(40.0))
    assert chosen(idle) == "Q8_0", "with the GPU to itself Q8_0 meets the floor"


def test_a_deadline_is_judged_with_the_decode_stretched_by_busy_runners() -> None:
    """Q4_K_M is busy: F16 would share the GPU with it, 256 tokens taking 2 × 4.65 s, past an 8 s deadline."""
    quants = ("F16", "Q4_K_M")
    candidates = ladder(quants, resident=quants, tps=MEASURED_TPS, busy=("Q4_K_M",))
    decision = decide(request(Q, prompt_tokens=0, time_remaining=8.0), candidates, free(40.0))
    assert [a.quantization for a in decision.candidates if a.at_risk] == ["F16"]
    assert chosen(decision) == "Q4_K_M"


@pytest.mark.parametrize(
    ("in_flight", "expected", "endangers"),
    [
        # Q4_K_M serves a request with 2 s left of service and 2.5 s to its deadline: a second runner would
        # delay it by min(F16's 4.65 s, 2 s) > its 0.5 s of slack, so QUALITY joins Q4_K_M's queue instead.
        (InFlight(2.0, 0.0, 130.0, time_left=2.5), "Q4_K_M", 1),
        # Its rate floor: 100 tok/s of 130 leaves 2 × (1.3 − 1) = 0.6 s of stretch, short of 2 s: endangered.
        (InFlight(2.0, 0.0, 130.0, min_tokens_per_second=100.0), "Q4_K_M", 1),
        (InFlight(2.0, 0.0, 130.0, time_left=30.0), "F16", 0),  # room to spare: F16 may slice the GPU with it
        (InFlight(2.0, 0.0, 130.0, time_left=1.0), "F16", 0),  # late whatever happens: nothing to protect
        (InFlight(2.0, 0.0, 130.0, min_tokens_per_second=60.0), "F16", 0),  # 130 / 2 still clears 60 tok/s
    ],
)
def test_a_new_runner_that_would_push_an_in_flight_request_past_its_slo_is_held_back(
        in_flight: InFlight, expected: str, endangers: int) -> None:
    quants = ("F16", "Q8_0", "Q4_K_M")
    candidates = ladder(quants, resident=quants, tps=MEASURED_TPS, busy=("Q4_K_M",))
    view = replace(free(40.0), backlog=(2.0,), in_flight=(in_flight,))
    decision = decide(request(Q, prompt_tokens=0), candidates, view)
    assert chosen(decision) == expected
    by_quant = {a.quantization: a for a in decision.candidates}
    assert by_quant["F16"].endangers == by_quant["Q8_0"].endangers == endangers
    assert by_quant["Q4_K_M"].endangers == 0, "joining the busy runner adds no runner to time-slice with"
    assert bool(by_quant["F16"].held_back) == bool(endangers)


# The arrivals charge is off by default (PolicyConfig.tight_arrivals says why); these tables turn it on.
ARRIVALS_CHARGED = PolicyConfig(tight_arrivals=0.2)


@pytest.mark.parametrize(("tight_rates", "busy", "resident", "expected", "held"), [
    ((0.0,) * 4, (), ("F16", "Q4_K_M"), "F16", set()),  # no caller with an SLO routed lately: quality as usual
    # 0.2/s of callers whose SLO bears one runner only: F16 (4.65 s) and Q8_0 (2.69 s) would each time-slice the GPU
    # with Q4_K_M's runner, which serves them, and 0.93 and 0.54 of them are expected meanwhile: QUALITY takes Q4_K_M.
    ((0.2, 0.0, 0.0, 0.0), (), ("F16", "Q4_K_M"), "Q4_K_M", {"F16", "Q8_0"}),
    # As many callers, but each bears two runners: the newcomer and Q4_K_M's make two, and nobody is hurt. The rate
    # alone (routing10's charge) held F16 and Q8_0 back here all the same.
    ((0.0, 0.2, 0.0, 0.0), (), ("F16", "Q4_K_M"), "F16", set()),
    # With Q8_0 serving, F16's runner would make three: those callers are hurt, Q8_0's batch adds no runner.
    ((0.0, 0.2, 0.0, 0.0), ("Q8_0",), ("F16", "Q8_0", "Q4_K_M"), "Q8_0", {"F16"}),
    ((0.0, 0.0, 0.2, 0.0), ("Q8_0",), ("F16", "Q8_0", "Q4_K_M"), "F16", set()),  # they bear three: not hurt
    # With Q4_K_M itself serving, F16's runner makes two: callers bearing two are not hurt (the rate alone held it).
    ((0.0, 0.2, 0.0, 0.0), ("Q4_K_M",), ("F16", "Q4_K_M"), "F16", set()),
    ((0.03, 0.0, 0.0, 0.0), (), ("F16", "Q4_K_M"), "F16", set()),  # 0.14 expected during F16's service: below 0.2
    ((0.2, 0.0, 0.0, 0.0), ("F16",), ("F16", "Q4_K_M"), "F16", {"Q8_0"}),  # F16 already serves: joining adds none
    ((0.2, 0.0, 0.0, 0.0), (), ("F16",), "F16", set()),  # nothing quicker is warm: the charge forces no cold load
])
def test_a_slow_new_runner_is_held_back_only_when_callers_expected_during_its_service_could_not_bear_it(
        tight_rates: tuple[float, ...], busy: tuple[str, ...], resident: tuple[str, ...], expected: str,
        held: set[str]) -> None:
    quants = ("F16", "Q8_0", "Q4_K_M")
    candidates = ladder(quants, resident=resident, tps=MEASURED_TPS, busy=busy)
    view = replace(free(40.0), tight_rates=tight_rates, backlog=(4.0,) * len(busy),
                   in_flight=tuple(InFlight(4.65) for _ in busy))
    decision = decide(request(Q, prompt_tokens=0), candidates, view, ARRIVALS_CHARGED)
    assert chosen(decision) == expected
    assert {a.quantization for a in decision.candidates if a.held_back} == held
    for quant in held:
        assert "time-slicing the GPU with llama3.1:8b-instruct-q4_k_m's" in assessment(decision, quant).held_back


@pytest.mark.parametrize(("resident", "expected"), [
    # Q5_K_M (127 tok/s) is as quick as warm Q4_K_M (130) within 5 %, but cold: its new runner would still
    # time-slice the GPU with Q4_K_M's for its 2.0 s, during which 0.6 callers bearing one runner are expected.
    (("Q4_K_M",), "Q4_K_M"),
    (("Q5_K_M", "Q4_K_M"), "Q5_K_M"),  # warm and as quick: either runner serves those callers as well
])
def test_a_quick_sibling_that_would_start_a_new_runner_is_held_back_too(resident: tuple[str, ...],
                                                                         expected: str) -> None:
    candidates = ladder(("Q5_K_M", "Q4_K_M"), resident=resident, tps={"Q5_K_M": 127.0, "Q4_K_M": 130.0})
    view = replace(free(40.0), tight_rates=(0.3, 0.0, 0.0, 0.0))
    decision = decide(request(Q, prompt_tokens=0), candidates, view, ARRIVALS_CHARGED)
    assert chosen(decision) == expected
    assert bool(assessment(decision, "Q5_K_M").held_back) == (expected == "Q4_K_M")


def _routed(tps: float, ttft: float, decode: float) -> Assessment:
    return Assessment("t", "Q4_K_M", 0, True, tps, True, ttft, ttft + decode, 0.9)


@pytest.mark.parametrize(("chosen_as", "time_remaining", "floor", "runners"), [
    (_routed(130.0, 0.5, 1.0), None, 60.0, 1),  # 130 tok/s ÷ 2 = 65, within 10 % of the 60 floor: bears one
    (_routed(140.0, 0.5, 1.0), None, 60.0, 2),  # 140 ÷ 2 = 70 ≥ 66: bears two
    (_routed(130.0, 0.5, 1.0), 4.0, 0.0, 3),  # 0.5 s + 3 × 1.0 s × 1.1 ≤ 4 s, not 4
    (_routed(130.0, 0.5, 1.0), 4.0, 60.0, 1),  # both: the tighter counts
    (_routed(130.0, 0.5, 1.0), 1.0, 0.0, 0),  # misses alone: no runner changes its outcome
    (_routed(130.0, 0.5, 1.0), 60.0, 0.0, SHARING_LEVELS + 1),  # bears more than any runner count tracked
])
def test_a_routed_request_bears_the_runners_its_slo_survives_with_room_to_spare(
        chosen_as: Assessment, time_remaining: float | None, floor: float, runners: int) -> None:
    assert runners_tolerated(chosen_as, time_remaining, floor) == runners


def test_offered_load_is_the_service_routed_per_second_over_the_window() -> None:
    arrivals = [(0.0, 10.0), (50.0, 6.0), (70.0, 9.0)]
    assert offered_load(arrivals, now=75.0) == pytest.approx((6.0 + 9.0) / LOAD_WINDOW_S)
    assert offered_load([], now=75.0) == 0.0


# The lead rule alone, as it stands where the smallest variant does not serve an overload (the default).
NO_SMALLEST = PolicyConfig()
# The smallest variant serves an overload (`smallest_under_overload`; off by default, see PolicyConfig).
SMALLEST = PolicyConfig(smallest_under_overload=1.0)


@pytest.mark.parametrize(("load", "resident", "expected"), [
    (0.5, ("F16", "Q6_K", "Q4_K_M"), "F16"),  # work arrives slower than the GPU serves it: quality as usual
    # Overloaded: one runner serving the queue in order beats several time-slicing runners that all miss;
    # Q6_K (110 tok/s) is more than 5 % slower than the quickest warm variant, Q4_K_M (130).
    (1.5, ("F16", "Q6_K", "Q4_K_M"), "Q4_K_M"),
    (1.5, ("F16",), "F16"),  # only F16 is warm: overload forces no cold load of a quicker sibling
])
def test_an_overloaded_gpu_takes_the_quickest_warm_variant(load: float, resident: tuple[str, ...],
                                                            expected: str) -> None:
    """Where the smallest variant does not serve the overload (`smallest_under_overload` off, the default; on, it
    would load Q4_K_M beside F16, test_under_overload_the_smallest_variant_serves_the_queue)."""
    quants = ("F16", "Q6_K", "Q4_K_M")
    decision = decide(request(Q, prompt_tokens=0), ladder(quants, resident=resident, tps=MEASURED_TPS),
                      replace(free(40.0), offered_load=load), NO_SMALLEST)
    assert chosen(decision) == expected
    held = {a.quantization for a in decision.candidates if a.held_back}
    assert held == ({"F16", "Q6_K"} if expected == "Q4_K_M" else set())


@pytest.mark.parametrize(("load", "busy", "expected", "held"), [
    (0.5, ("Q4_K_M",), "Q6_K", set()),  # not overloaded: a second runner is fine, quality as usual
    # Overloaded with Q4_K_M serving: Q6_K (127 tok/s, within 5 % of Q4_K_M's 130) counts as quick, but its idle
    # runner, like cold Q5_K_M's load, would only time-slice the GPU with Q4_K_M's queue.
    (1.5, ("Q4_K_M",), "Q4_K_M", {"Q6_K", "Q5_K_M"}),
    (1.5, ("Q6_K",), "Q6_K", {"Q4_K_M", "Q5_K_M"}),  # the busy quick runner is Q6_K: the rest join its queue
    (1.5, ("Q6_K", "Q4_K_M"), "Q4_K_M", {"Q6_K", "Q5_K_M"}),  # two serve: the quicker takes the queue, Q6_K drains
    (1.5, (), "Q6_K", set()),  # no runner serving: nothing to join, quality among the quick ones
])
def test_an_overloaded_gpu_keeps_to_the_quick_runner_that_serves(load: float, busy: tuple[str, ...],
                                                                   expected: str, held: set[str]) -> None:
    """Where the smallest variant does not serve the overload (`smallest_under_overload` off, the default)."""
    quants = ("Q6_K", "Q5_K_M", "Q4_K_M")
    candidates = ladder(quants, resident=("Q6_K", "Q4_K_M"), tps={"Q6_K": 127.0, "Q4_K_M": 130.0}, busy=busy)
    decision = decide(request(Q, prompt_tokens=0), candidates, replace(free(40.0), offered_load=load), NO_SMALLEST)
    assert chosen(decision) == expected
    assert {a.quantization for a in decision.candidates if a.held_back} == held
    assert all(f"time-slice the GPU with {tag(expected)}'s" in a.held_back
               for a in decision.candidates if a.quantization in held)


@pytest.mark.parametrize(("busy", "tps", "expected", "held"), [
    # Q6_K's batches read 100 tok/s, Q8_0 110 alone: only the rates say Q8_0 is quicker, and Q8_0 reads more
    # bytes per token. Q6_K keeps the queue; Q8_0's idle runner would only time-slice the GPU with it.
    (("Q6_K",), {"Q8_0": 110.0, "Q6_K": 100.0}, "Q6_K", {"Q8_0"}),
    # The other way round Q6_K reads fewer bytes and is quicker: the busy Q8_0 is slower than a warm variant.
    (("Q8_0",), {"Q8_0": 90.0, "Q6_K": 110.0}, "Q6_K", {"Q8_0"}),
])
def test_under_overload_a_busy_runner_is_compared_only_with_smaller_idle_ones(
        busy: tuple[str, ...], tps: dict[str, float], expected: str, held: set[str]) -> None:
    """A busy runner's rate is measured in batches and beside other runners, an idle sibling's alone: only a
    sibling that reads no more memory per token can show that the busy runner is slow."""
    quants = ("Q8_0", "Q6_K")
    candidates = ladder(quants, resident=quants, tps=tps, busy=busy)
    decision = decide(request(Q, prompt_tokens=0), candidates, replace(free(40.0), offered_load=1.5), NO_SMALLEST)
    assert chosen(decision) == expected
    assert {a.quantization for a in decision.candidates if a.held_back} == held


@pytest.mark.parametrize(("load", "resident", "busy", "tps", "config", "expected"), [
    # Q4_K_M's runner measured in batches beside others (100 tok/s) looks slower than Q6_K's (110): by rates the
    # lead rule keeps Q6_K, but Q4_K_M reads 30 % fewer bytes per token and serves the queue.
    (1.5, ("F16", "Q6_K", "Q4_K_M"), ("Q6_K",), {"Q6_K": 110.0, "Q4_K_M": 100.0}, None, "Q4_K_M"),
    (1.5, ("F16", "Q6_K", "Q4_K_M"), ("Q6_K",), {"Q6_K": 110.0, "Q4_K_M": 100.0}, NO_SMALLEST, "Q6_K"),
    # Only F16 warm: Q4_K_M's 5 s load is repaid by 45 s of work × 67 % fewer bytes = 30 GPU seconds saved.
    (1.5, ("F16",), ("F16",), MEASURED_TPS, None, "Q4_K_M"),
    # Q5_K_M warm: Q4_K_M saves 13 % of 30 s of work, 3.9 s, short of its 5 s load: Q5_K_M serves.
    (1.0, ("Q5_K_M",), ("Q5_K_M",), MEASURED_TPS, None, "Q5_K_M"),
    # At 1.5 the same saving is 5.8 s: the load pays.
    (1.5, ("Q5_K_M",), ("Q5_K_M",), MEASURED_TPS, None, "Q4_K_M"),
    # Not overloaded: quality as usual.
    (0.5, ("F16", "Q6_K", "Q4_K_M"), ("Q6_K",), MEASURED_TPS, None, "F16"),
])
def test_under_overload_the_smallest_variant_serves_the_queue(load: float, resident: tuple[str, ...],
                                                              busy: tuple[str, ...], tps: dict[str, float],
                                                              config: PolicyConfig | None, expected: str) -> None:
    """Q2_K (below the speed floor, and measured no faster) never serves an overload; every other variant but the
    one that serves is held back, saying which serves and why."""
    quants = ("F16", "Q6_K", "Q5_K_M", "Q4_K_M", "Q2_K")
    candidates = ladder(quants, resident=resident, tps=tps, busy=busy)
    decision = decide(request(Q, prompt_tokens=0), candidates, replace(free(60.0), offered_load=load),
                      config or SMALLEST)
    assert chosen(decision) == expected
    serving = [a for a in decision.candidates if "serves the queue, the variant with the least" in a.held_back]
    if config is None and load >= 1.0 and expected == "Q4_K_M":
        assert {a.quantization for a in serving} == {"F16", "Q6_K", "Q5_K_M"}
        assert all(a.held_back.count(f"{tag('Q4_K_M')} serves the queue") == 1 for a in serving)
        repaid = "load repaid by the" in serving[0].held_back
        assert repaid == ("Q4_K_M" not in resident)
    else:
        assert not serving


@pytest.mark.parametrize(("load", "surge", "factor", "expected", "why"), [
    (0.3, 0.0, 2.0, "F16", ""),  # quiet: quality as usual
    # A burst's first seconds: 2.4 s of work a second over the last 10 s, quiet over 30 s: read as 1.2, overloaded.
    (0.3, 2.4, 2.0, "Q4_K_M", "offered load 1.20 (2.40 over the last 10 s ÷ 2) ≥ 1"),
    (0.3, 2.4, 0.0, "F16", ""),  # the surge reading off
    (1.5, 0.4, 2.0, "Q4_K_M", "offered load 1.50 ≥ 1"),  # the whole window reads higher: it decides
])
def test_a_surge_over_the_newest_seconds_counts_as_load_at_a_discount(load: float, surge: float, factor: float,
                                                                      expected: str, why: str) -> None:
    quants = ("F16", "Q6_K", "Q4_K_M")
    candidates = ladder(quants, resident=quants, tps=MEASURED_TPS, busy=("Q4_K_M",))
    decision = decide(request(Q, prompt_tokens=0), candidates,
                      replace(free(40.0), offered_load=load, surge_load=surge), PolicyConfig(surge_factor=factor))
    assert chosen(decision) == expected
    assert assessment(decision, "F16").held_back.startswith(why)
    assert bool(assessment(decision, "F16").held_back) == bool(why)


@pytest.mark.parametrize(("in_flight", "limit", "expected"), [
    (3, 0.0, "F16"),  # off (a node router's default): a low offered load is quiet, whatever waits
    (3, 1.0, "Q4_K_M"),  # 4 s of Q4_K_M's 6 s wait for its slot: overloaded, whatever the recent rate
    (1, 1.0, "F16"),  # one stream on its own runner waits for nothing: no queue, no overload
])
def test_work_queued_for_a_slot_counts_as_overload_where_the_limit_is_set(in_flight: int, limit: float,
                                                                          expected: str) -> None:
    """Offered load 0.2 (a burst just begun fills the queues well before the load window); Q4_K_M's runner
    serves `in_flight` requests with 6 s of work among them, one at a time (OLLAMA_NUM_PARALLEL 1)."""
    quants = ("F16", "Q6_K", "Q4_K_M")
    candidates = [replace(c, in_flight=in_flight, queued_seconds=6.0) if c.variant.quant.name == "Q4_K_M" else c
                  for c in ladder(quants, resident=quants, tps=MEASURED_TPS)]
    decision = decide(request(Q, prompt_tokens=0), candidates, replace(free(40.0), offered_load=0.2),
                      PolicyConfig(queue_overload_seconds=limit))
    assert chosen(decision) == expected
    if expected == "Q4_K_M":
        assert "4.0 s of work queued for a slot ≥ 1 s" in assessment(decision, "F16").held_back


def test_an_upgrade_that_only_fits_by_evicting_an_idle_sibling_is_held_back() -> None:
    """Q4_K_M resident and idle, 9 GiB free: Q8_0 (8.46 GiB) fits only by evicting it, and other tenants may
    take what the eviction frees before Q8_0 is loaded; Q6_K (6.64 GiB) fits beside it."""
    candidates = ladder(("Q8_0", "Q6_K", "Q4_K_M"), resident=("Q4_K_M",), tps=MEASURED_TPS)
    decision = decide(request(Q), candidates, free(9.0))
    by_quant = {a.quantization: a for a in decision.candidates}
    assert by_quant["Q8_0"].feasible and by_quant["Q8_0"].churn_seconds > 0
    assert "evicts idle siblings" in by_quant["Q8_0"].held_back
    assert chosen(decision) == "Q6_K"
    roomy = decide(request(Q), candidates, free(11.5))  # 80 % of 11.05 GiB: Q8_0 fits beside Q4_K_M
    assert chosen(roomy) == "Q8_0" and not any(a.held_back for a in roomy.candidates)
    own = decide(request(Q), candidates, replace(free(9.0), shared=False))
    assert chosen(own) == "Q8_0", "memory no one else can take (a static capacity): the eviction is only churn"


@pytest.mark.parametrize(("source", "expected"), [("static", "Q8_0"), ("nvml", "F16")])
def test_a_variant_still_loading_holds_its_memory_where_free_memory_comes_from_the_resident_list(
        source: str, expected: str) -> None:
    """Q4_K_M is loading for a request in flight and `/api/ps` does not list it yet, so a configured capacity still
    reads its memory as free: 20 GiB, where F16 fits alone but not beside Q4_K_M. NVML's free memory drops as the
    load allocates, so there nothing more is taken."""
    pool = ladder(("F16", "Q8_0", "Q4_K_M"), tps=MEASURED_TPS, busy=("Q4_K_M",))
    memory = MemoryView(int(20.0 * GIB), RESERVE, source)
    decision = decide(request(Q), pool, memory)
    assert chosen(decision) == expected
    if source == "static":
        assert "free" in assessment(decision, "F16").rejection
