"""Units and their formatting, defined once."""

from __future__ import annotations

__all__ = ["NS", "GiB", "MiB", "format_bytes"]

NS = 1_000_000_000  # nanoseconds per second: Ollama reports durations in ns
MiB = 1 << 20
GiB = 1 << 30


def format_bytes(n: float) -> str:
    for unit, size in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                       ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
