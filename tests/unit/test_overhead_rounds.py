"""bench.overhead's rounds: a steady-state scenario spreads its streams' starts over one request's duration and
leaves each stream's first request out of the TTFT quantiles; a simultaneous start sends every stream at once.

The requests are coroutines that sleep for a request's duration (what a paced backend takes) and note when they
were called: what is tested is the bench's own scheduling and counting, not any router.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from bench.overhead import (
    FLOOR,
    PACED,
    PACED_TOKENS_PER_S,
    ROUTER,
    TTFT_BURST,
    TTFT_MANY,
    Arm,
    Sample,
    Scenario,
    Spread,
    beyond_floor,
    run_round,
)

# A request lasts 50 tokens at 50 tok/s, 1 s: long enough that a busy machine's scheduling delays (tens of ms)
# stay well inside the 125 ms that separate one stream's start from the next.
STREAMS, PER_STREAM, TOKENS = 8, 3, 50
SLOW_FIRST_S = 9.0  # a ramp request's TTFT, far above every measured one


async def round_of(scenario: Scenario) -> tuple[Arm, list[float]]:
    """One round; returns the arm and when each stream's first request was called, from the round's start.

    A stream is its own task (run_round gathers them), so a request knows its stream by the task it runs in: a
    stream's first request is its own first call, however late a slow machine made it."""
    firsts: dict[asyncio.Task[None], float] = {}
    started = time.perf_counter()

    async def request() -> Sample:
        stream = asyncio.current_task()
        assert stream is not None
        first = stream not in firsts
        firsts.setdefault(stream, time.perf_counter() - started)
        await asyncio.sleep(scenario.request_s)
        return Sample(SLOW_FIRST_S if first and scenario.staggered else 0.001, TOKENS)

    arm = Arm()
    await run_round(request, scenario, arm, os.getpid())
    assert len(firsts) == scenario.streams
    return arm, sorted(firsts.values())


async def test_steady_streams_start_spread_over_one_request_and_their_first_requests_are_not_measured() -> None:
    scenario = Scenario(PACED, STREAMS, PER_STREAM, TOKENS, staggered=True)
    arm, firsts = await round_of(scenario)
    assert scenario.request_s == TOKENS / PACED_TOKENS_PER_S
    # Stream i waits i/8 of 1 s: the last starts at least most of 875 ms after the first, none after 1 s.
    assert 0.8 * (STREAMS - 1) / STREAMS * scenario.request_s <= firsts[-1] - firsts[0] < scenario.request_s
    assert len(arm.samples) == STREAMS * PER_STREAM and arm.tokens == STREAMS * PER_STREAM * TOKENS
    assert arm.measured == STREAMS * (PER_STREAM - 1)
    assert arm.ttft_ms(0.99) == 1.0  # the ramp's slow first requests are left out of the quantiles


async def test_streams_starting_at_once_are_all_sent_together_and_all_measured() -> None:
    scenario = Scenario(PACED, STREAMS, PER_STREAM, TOKENS)
    arm, firsts = await round_of(scenario)
    assert firsts[-1] - firsts[0] < scenario.request_s / STREAMS
    assert arm.measured == len(arm.samples) == STREAMS * PER_STREAM


def test_the_target_row_measures_at_least_200_requests_an_arm_in_steady_state() -> None:
    assert TTFT_MANY.staggered and not TTFT_BURST.staggered
    assert TTFT_MANY.streams == TTFT_BURST.streams == 64
    measured_per_round = TTFT_MANY.streams * sum(TTFT_MANY.measured(i) for i in range(TTFT_MANY.per_stream))
    assert 2 * measured_per_round >= 200  # two rounds an arm a repetition


def test_the_routers_own_part_is_paired_with_the_bare_relay_repetition_by_repetition() -> None:
    """A difference for milliseconds, a ratio for a rate, each within its repetition; then the median and range."""
    rows = [{"scenario": TTFT_MANY.name, "repetition": rep, "arm": arm, "added_ttft_p99_ms": ms,
             "relay_vs_direct": rate}
            for rep, arm, ms, rate in ((1, ROUTER, 9.0, 0.6), (1, FLOOR, 4.0, 0.8), (2, ROUTER, 5.0, 0.7),
                                       (2, FLOOR, 4.0, 0.7), (3, ROUTER, 6.0, 0.5), (3, FLOOR, 3.0, 1.0))]
    assert beyond_floor(rows, TTFT_MANY, "added_ttft_p99_ms") == Spread(3.0, 1.0, 5.0)
    rates = beyond_floor(rows, TTFT_MANY, "relay_vs_direct")
    assert (rates.median, rates.low, rates.high) == pytest.approx((0.75, 0.5, 1.0))
