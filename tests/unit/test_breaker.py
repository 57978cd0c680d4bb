"""The per-variant breaker: opens after N consecutive failures, for a cool-down, on a passed-in clock."""

from __future__ import annotations

import pytest

from quantrouter.breaker import Breaker

THRESHOLD = 3
COOLDOWN = 30.0
TAG = "llama3.1:8b-instruct-q8_0"


@pytest.mark.parametrize(
    ("failure_times", "opened_by", "open_at", "closed_at"),
    [
        ([0.0, 1.0, 2.0], [False, False, True], [2.0, 31.9], [32.0, 100.0]),
        ([0.0, 1.0], [False, False], [], [0.0, 1.0, 2.0]),
        # A failure while already open does not extend the cool-down.
        ([0.0, 1.0, 2.0, 10.0, 11.0, 12.0], [False, False, True, False, False, False], [31.9], [32.0]),
    ],
)
def test_breaker_opens_after_threshold_for_the_cooldown(
    failure_times: list[float], opened_by: list[bool], open_at: list[float], closed_at: list[float]
) -> None:
    breaker = Breaker(THRESHOLD, COOLDOWN)
    assert [breaker.failure(TAG, t) for t in failure_times] == opened_by
    assert all(breaker.is_open(TAG, t) for t in open_at)
    assert not any(breaker.is_open(TAG, t) for t in closed_at)


def test_success_resets_the_count() -> None:
    breaker = Breaker(THRESHOLD, COOLDOWN)
    breaker.failure(TAG, 0.0)
    breaker.failure(TAG, 1.0)
    breaker.success(TAG)
    assert breaker.failure(TAG, 2.0) is False
    assert not breaker.is_open(TAG, 2.0)


def test_success_closes_an_open_breaker() -> None:
    breaker = Breaker(1, COOLDOWN)
    assert breaker.failure(TAG, 0.0)
    breaker.success(TAG)
    assert not breaker.is_open(TAG, 1.0)


def test_breakers_are_per_variant_and_open_for_their_own_cooldown() -> None:
    breaker = Breaker(1, COOLDOWN)
    breaker.failure("a", 0.0)
    breaker.failure("b", 10.0)

    def open_at(now: float) -> list[str]:
        return [tag for tag in ("a", "b", "c") if breaker.is_open(tag, now)]

    assert open_at(5.0) == ["a", "b"]
    assert open_at(35.0) == ["b"]
    assert open_at(45.0) == []
    assert not breaker.is_open("c", 0.0)
