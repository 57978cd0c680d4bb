"""The order statistic the benchmarks report: one definition, so a p99 means the same in every results file."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The value at rank ⌊q·n⌋ of the sorted values (the last for q = 1), or NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
