"""For measurements of what a router leaves behind, which run in a process of their own: in the full suite the
session-wide routers and fleet nodes also allocate, and leave garbage, in the test process."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.processes import canned_ollama
from prometheus_client import CollectorRegistry

import quantrouter
from quantrouter.config import load_settings
from quantrouter.server import RunningServer, run_in_thread

ROOT = Path(quantrouter.__file__).parent.parent.parent
# The whole measuring process, router start to the last reading.
PROCESS_TIMEOUT_S = 300.0


@contextlib.contextmanager
def router_over_canned(tokens_per_second: float, **settings: object) -> Iterator[RunningServer]:
    """A router in this process (in a thread of its own), in front of the canned Ollama fixture in its own."""
    with tempfile.TemporaryDirectory() as logs, canned_ollama("canned", tokens_per_second, Path(logs)) as backend:
        config = load_settings({"grpc_address": "127.0.0.1:0", "metrics_address": "127.0.0.1:0",
                                "ollama_host": backend.address, "memory_capacity": "80GiB", "memory_reserve": 0,
                                **settings}, {})
        with run_in_thread(config, CollectorRegistry()) as running:
            yield running


def measured_in_own_process(module: str) -> dict[str, int]:
    """`python -m module`'s reading: the JSON object its last line prints (the run fails with its stderr)."""
    result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True,
                            timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    reading: dict[str, int] = json.loads(result.stdout.splitlines()[-1])
    return reading
