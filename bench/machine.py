"""One line naming the machine a benchmark ran on, for the results files (numbers mean little without it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def describe() -> str:
    """CPU model, core count, OS and Python version."""
    lines = CPUINFO.read_text().splitlines() if CPUINFO.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")
