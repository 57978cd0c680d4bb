"""The machine a benchmark ran on (numbers mean little without it), and what Linux reports of its processes and
ports for the benchmarks that spawn them."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def describe() -> str:
    """CPU model, core count, OS and Python version."""
    lines = CPUINFO.read_text().splitlines() if CPUINFO.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads (proc(5): fields 14 and 15, counted after the `comm` field)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def busy_seconds() -> float:
    """CPU time every process on the machine has spent busy, all cores (proc(5): /proc/stat's `cpu` line, all
    but idle and iowait; guest time is already inside user)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def memory_mib(pid: int, name: str) -> float:
    """VmRSS (resident now) or VmHWM (its peak so far) of a process, from /proc/<pid>/status (proc(5))."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def free_port() -> int:
    """A loopback port free right now (for a program that takes a port number, not 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
