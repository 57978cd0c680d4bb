"""The order statistic the benchmarks report: one definition, so a p99 means the same in every results file;
and the spread of paired samples, shown the same way wherever one is."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The value at rank ⌊q·n⌋ of the sorted values (the last for q = 1), or NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True, slots=True)
class Paired:
    """The differences of two arms measured in the same rounds (arm − base, one a round): their median, and their
    p10 and p90, so that a paired figure shows how far the rounds disagree, not only their middle."""

    median: float
    p10: float
    p90: float

    def text(self, unit: str) -> str:
        return f"{self.median:.2f} {unit}, p10–p90 {self.p10:.2f} to {self.p90:.2f} {unit}"


def paired(arm: Sequence[float], base: Sequence[float]) -> Paired:
    """`arm` − `base` round by round (both in round order, one sample a round each)."""
    differences = [a - b for a, b in zip(arm, base, strict=True)]
    if not differences:
        return Paired(float("nan"), float("nan"), float("nan"))
    return Paired(statistics.median(differences), percentile(differences, 0.1), percentile(differences, 0.9))
