"""The plain API values: `quick_constructor` and `quick_replacer` build the same frozen values as the dataclass
itself and `dataclasses.replace`."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from quantrouter.values import Assessment, Decision, Preference, quick_constructor, quick_replacer


def test_quick_constructor_builds_the_same_frozen_value() -> None:
    build = quick_constructor(Assessment)
    fields = dict(tag="t", quantization="Q4_K_M", memory_bytes=5, resident=True, tokens_per_second=120.0,
                  measured=True, time_to_first_token=0.2, expected_seconds=2.5, quality=0.92, queue_seconds=0.4)
    quick, plain = build(**fields), Assessment(**fields)
    assert type(quick) is Assessment
    assert quick == plain and hash(quick) == hash(plain) and repr(quick) == repr(plain)
    assert quick.rejection == "" and quick.score == 0.0, "defaults filled in as the dataclass does"
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.score = 1.0  # type: ignore[misc]
    assert dataclasses.replace(quick, score=1.0).score == 1.0
    assert pickle.loads(pickle.dumps(quick)) == plain


def test_quick_constructor_fills_default_factories() -> None:
    decision = quick_constructor(Decision)("f", Preference.LATENCY, None, "nothing")
    assert decision == Decision("f", Preference.LATENCY, None, "nothing")
    assert decision.candidates == ()


def test_quick_constructor_takes_only_dataclass_types() -> None:
    with pytest.raises(TypeError):
        quick_constructor(len)


def test_quick_replacer_matches_dataclasses_replace() -> None:
    original = Assessment("t", "Q4_K_M", 5, True, 120.0, True, 0.2, 2.5, 0.92, queue_seconds=0.4)
    quick = quick_replacer(Assessment)(original, churn_seconds=1.5, queue_seconds=0.0)
    assert type(quick) is Assessment
    assert quick == dataclasses.replace(original, churn_seconds=1.5, queue_seconds=0.0)
    assert (quick.churn_seconds, quick.queue_seconds, original.churn_seconds) == (1.5, 0.0, 0.0)
    with pytest.raises(KeyError):
        quick_replacer(Assessment)(original, no_such_field=1)
