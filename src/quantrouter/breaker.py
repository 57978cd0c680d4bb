"""Per-variant circuit breaker: after repeated failures a variant is skipped for a cool-down.

In the spirit of Envoy's outlier detection (consecutive errors eject a host for a while). The clock is
passed in, so the breaker is plain state that tests drive with numbers.
"""

from __future__ import annotations

__all__ = ["Breaker"]


class Breaker:
    def __init__(self, failures: int, cooldown: float) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._failures: dict[str, int] = {}
        self._open_until: dict[str, float] = {}

    def is_open(self, tag: str, now: float) -> bool:
        return self._open_until.get(tag, 0.0) > now

    def success(self, tag: str) -> None:
        self._failures.pop(tag, None)
        self._open_until.pop(tag, None)

    def failure(self, tag: str, now: float) -> bool:
        """Count a failure; True when this one opens the breaker."""
        count = self._failures.get(tag, 0) + 1
        self._failures[tag] = count
        if count >= self._threshold and not self.is_open(tag, now):
            self._open_until[tag] = now + self._cooldown
            self._failures[tag] = 0
            return True
        return False
