"""The replay benchmark's trace and static rules (pure parts; the run itself is `python -m bench.replay`)."""

from __future__ import annotations

import itertools

import pytest
from bench.replay import MIX, NUM_PREDICT, PROMPTS, largest_fitting_free, make_trace, parse_args, rule_of_thumb_tag

from quantrouter.calibration import VariantCalibration
from quantrouter.client import Variant, VariantListing
from quantrouter.units import MiB

SPEED = VariantCalibration(decode_tps=10.0, prompt_tps=48.0, load_seconds=1.0, samples=4)


def _listing(free: int, resident: str = "") -> VariantListing:
    sizes = {"gemma3:270m-f16": 518, "gemma3:270m-q8_0": 278, "gemma3:270m-q4_K_M": 241}
    variants = tuple(Variant(tag, tag.rsplit("-", 1)[1].upper(), size * MiB, 268_000_000, tag == resident, 0, 10.0,
                             False, 0, 1.0) for tag, size in sizes.items())
    return VariantListing({"gemma3:270m": variants}, "static", free, 2048 * MiB)


def test_a_seed_makes_the_same_trace_and_deadlines_follow_the_measured_speed() -> None:
    trace = make_trace(7, 50, 0.5, SPEED)
    assert trace == make_trace(7, 50, 0.5, SPEED) != make_trace(8, 50, 0.5, SPEED)
    assert all(a.at < b.at for a, b in itertools.pairwise(trace))
    assert {r.preference for r in trace} == {p for p, _, _ in MIX}
    assert all(r.prompt in PROMPTS and r.num_predict in NUM_PREDICT for r in trace)
    slack = {p: s for p, _, s in MIX}
    for r in trace:
        expected = 24 / SPEED.prompt_tps + r.num_predict / SPEED.decode_tps
        assert r.deadline == 0.5 + slack[r.preference] * expected


def test_rule_of_thumb_takes_the_best_file_that_fits_times_1_2() -> None:
    assert rule_of_thumb_tag(_listing(0), 700 * MiB) == "gemma3:270m-f16"  # 518 × 1.2 = 622 MiB
    assert rule_of_thumb_tag(_listing(0), 600 * MiB) == "gemma3:270m-q8_0"


def test_largest_fits_free_counts_what_is_resident() -> None:
    assert largest_fitting_free(_listing(300 * MiB)) == "gemma3:270m-q8_0"
    assert largest_fitting_free(_listing(100 * MiB, resident="gemma3:270m-f16")) == "gemma3:270m-f16"
    assert largest_fitting_free(_listing(100 * MiB)) == "gemma3:270m-q4_K_M"


def test_a_run_takes_router_settings_by_name_and_refuses_a_malformed_one(capsys: pytest.CaptureFixture[str]) -> None:
    """`--setting` feeds `config.with_keys`, which casts each value and refuses an unknown name, as a flag would."""
    args = parse_args(["--setting", "smallest_under_overload=1", "--setting", "tight_arrivals=0.5"])
    assert args.setting == {"smallest_under_overload": "1", "tight_arrivals": "0.5"}
    assert parse_args([]).setting == {}
    with pytest.raises(SystemExit):
        parse_args(["--setting", "smallest_under_overload"])
    assert "--setting wants NAME=VALUE" in capsys.readouterr().err
