"""Agreement between greedy runs: pure functions, table-tested."""

from __future__ import annotations

import pytest

from quantrouter.tools.measure import Step, greedy_agreement, top_k_agreement


@pytest.mark.parametrize(("reference", "tokens", "agreement"), [
    (["a", "b", "c", "d"], ["a", "b", "c", "d"], 1.0),
    (["a", "b", "c", "d"], ["a", "b", "x", "d"], 0.5),  # after a divergence nothing counts, even a match
    (["a", "b", "c", "d"], ["x", "b", "c", "d"], 0.0),
    (["a", "b", "c", "d"], ["a", "b"], 0.5),
    (["a", "b"], ["a", "b", "c"], 1.0),
    ([], [], 1.0),
    ([], ["a"], 0.0),
])
def test_greedy_agreement_is_the_shared_prefix_share(reference: list[str], tokens: list[str],
                                                     agreement: float) -> None:
    assert greedy_agreement(reference, tokens) == agreement


def test_top_k_agreement_needs_logprobs() -> None:
    assert top_k_agreement([Step("a"), Step("b")], [Step("a"), Step("b")]) is None


def test_top_k_agreement_averages_set_overlap_up_to_the_first_divergence() -> None:
    reference = [Step("a", ("a", "b")), Step("c", ("c", "d")), Step("e", ("e", "f"))]
    variant = [Step("a", ("a", "b")), Step("d", ("d", "c")), Step("zz", ("zz", "yy"))]
    # position 0: {a,b} vs {a,b} = 1; position 1 (the divergence): {c,d} vs {d,c} = 1; position 2 is after it.
    assert top_k_agreement(reference, variant) == 1.0
    variant = [Step("a", ("a", "x")), Step("c", ("c", "d")), Step("e", ("q", "r"))]
    assert top_k_agreement(reference, variant) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
