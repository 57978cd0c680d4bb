"""The quality measures (KL divergence, same top token, perplexity ratio) and the calibration file's safety.

Pure arithmetic on hand-made distributions, so each figure can be checked against a hand computation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from quantrouter.calibration import CalibrationFile, VariantCalibration, read_calibration, write_calibration
from quantrouter.tools.measure import Step
from quantrouter.tools.quality import compare_positions, compare_top_k, evaluation_text, summarise


def test_kl_top1_and_likelihoods_match_a_hand_computation() -> None:
    reference = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], dtype=np.float32))
    variant = np.log(np.array([[0.25, 0.5, 0.25], [0.2, 0.6, 0.2]], dtype=np.float32))
    scores = compare_positions(reference, variant, np.array([0, 1]))
    first = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    second = 2 * 0.1 * math.log(0.5) + 0.8 * math.log(0.8 / 0.6)
    assert scores.kl == pytest.approx([first, second], rel=1e-5)
    assert list(scores.same_top) == [0.0, 1.0]
    assert scores.nll_reference == pytest.approx([-math.log(0.5), -math.log(0.8)], rel=1e-5)
    assert scores.nll_variant == pytest.approx([-math.log(0.25), -math.log(0.6)], rel=1e-5)


def test_summary_reports_means_ratio_and_standard_errors() -> None:
    reference = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], dtype=np.float32))
    variant = np.log(np.array([[0.25, 0.5, 0.25], [0.2, 0.6, 0.2]], dtype=np.float32))
    scores = compare_positions(reference, variant, np.array([0, 1]))
    quality = summarise([scores], "test")
    assert quality.positions == 2 and quality.top1 == 0.5
    assert quality.top1_stderr == pytest.approx(math.sqrt(0.25 / 2))
    assert quality.kl_mean == pytest.approx(float(scores.kl.mean()))
    ratio = math.exp(((math.log(0.5) - math.log(0.25)) + (math.log(0.8) - math.log(0.6))) / 2)
    assert quality.ppl_ratio == pytest.approx(ratio, rel=1e-5)
    assert quality.kl_stderr > 0 and quality.ppl_ratio_stderr > 0


def test_a_variant_against_itself_measures_perfect() -> None:
    logits = np.random.default_rng(1).normal(size=(5, 50)).astype(np.float32)
    quality = summarise([compare_positions(logits, logits, np.arange(5))], "test")
    assert (quality.top1, quality.top1_stderr, quality.ppl_ratio) == (1.0, 0.0, pytest.approx(1.0))
    assert quality.kl_mean == pytest.approx(0.0, abs=1e-12)


def test_top_k_comparison_stops_at_the_first_divergence() -> None:
    reference = [Step("a", ("a", "b"), (math.log(0.9), math.log(0.1))),
                 Step("c", ("c", "d"), (math.log(0.6), math.log(0.4))),
                 Step("e", ("e",), (0.0,))]
    variant = [Step("a", ("a", "b"), (math.log(0.9), math.log(0.1))),
               Step("d", ("d", "c"), (math.log(0.6), math.log(0.4))),
               Step("e", ("e",), (0.0,))]
    scores = compare_top_k(reference, variant)
    assert list(scores.same_top) == [1.0, 0.0]  # the third position has a different context: not compared
    assert scores.kl[0] == pytest.approx(0.0, abs=1e-12)
    assert scores.kl[1] == pytest.approx(0.6 * math.log(0.6 / 0.4) + 0.4 * math.log(0.4 / 0.6))
    assert scores.nll_variant[1] == pytest.approx(-math.log(0.4))  # the reference's token "c"


def test_shipped_text_names_its_provenance() -> None:
    text = evaluation_text()
    assert len(text.entries) >= 8
    assert all(whole.startswith(prompt) and len(whole) > len(prompt) for prompt, whole in text.entries)
    assert text.provenance["model"] == "gemma3:270m-f16" and "options" in text.provenance["request"]


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    write_calibration(path, CalibrationFile("2026-01-01T00:00:00+00:00", {"a:1": VariantCalibration(10, 20, 1, 4)}))
    before = path.read_bytes()
    unserialisable = CalibrationFile("now", {"a:1": VariantCalibration(11, 21, 1, 4)},
                                     quality_text={"broken": object()})  # a fault injected on purpose
    with pytest.raises(TypeError):
        write_calibration(path, unserialisable)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temporary file left behind


def test_version_1_files_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"version": 1, "created_at": "x", "variants": {
        "a:1": {"decode_tps": 10, "prompt_tps": 20, "load_seconds": 1, "samples": 4, "agreement": 0.5}}}))
    assert read_calibration(path) == {"a:1": VariantCalibration(10, 20, 1, 4, 0.5)}
