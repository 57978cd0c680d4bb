"""The loads the router started and has not yet seen finish.

Ollama's `/api/ps` lists a runner only once it is loaded, while its memory leaves NVML's free figure as soon as
the load starts, and the load runs on when the request that started it is cancelled (a deadline, a caller gone).
Between the two the policy would see the memory taken by nothing it knows, and refuse every variant for memory.
The router remembers each load it started until the backend lists the variant resident, the load's expected
time with a margin has passed, or the backend reports it gone (an error on its stream), and tells the policy
(`CandidateInput.loading`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LOAD_MARGIN", "LoadsStarted"]

# How many times its expected time a load is remembered. Load times scatter (disk cache, contention; the
# simulator's load-jitter engine draws them lognormal with σ 0.4, so 3× is beyond 2.7σ); a load forgotten too
# early leaves its memory unexplained, one remembered too long only counts a runner as resident that a request
# would then load again.
LOAD_MARGIN = 3.0


@dataclass(slots=True)
class LoadsStarted:
    """Each variant whose load the router started, with the time after which it is no longer expected to finish."""

    _until: dict[str, float] = field(default_factory=dict)

    def started(self, tag: str, now: float, expected_seconds: float) -> None:
        """A request went to `tag`, not resident, its first token expected within `expected_seconds` (the wait, the
        load and the prompt); the first such request's load is the one under way, so a later one does not extend it."""
        self._until.setdefault(tag, now + expected_seconds * LOAD_MARGIN)

    def gone(self, tag: str) -> None:
        """The backend failed `tag`'s request: whatever it was loading is not there."""
        self._until.pop(tag, None)

    def loading(self, now: float, resident: Callable[[str], bool]) -> frozenset[str]:
        """The tags still loading; those now `resident`, or past their time, are forgotten."""
        if not self._until:
            return frozenset()
        for tag, until in list(self._until.items()):
            if until < now or resident(tag):
                del self._until[tag]
        return frozenset(self._until)
