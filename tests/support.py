"""Helpers shared by the tests (not fixtures: plain functions and constants)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from quantrouter.config import Settings, load_settings
from quantrouter.embedded import EmbeddedServer
from quantrouter.server import RunningServer

FAMILY = "gemma3:270m"


@dataclass
class ManualClock:
    """A clock the test moves (`now`), for code that takes a `clock` callable."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def router_settings(backend: EmbeddedServer, environ: Mapping[str, str] | None = None, **overrides: object
                    ) -> Settings:
    """Settings for a router in front of `backend`, with the backend's budget as its static capacity
    (`environ`: `QUANTROUTER_*` variables, read as the process environment would be; `overrides`: keys, as
    flags would set them)."""
    return load_settings({"grpc_address": "127.0.0.1:0", "metrics_address": "127.0.0.1:0",
                          "ollama_host": backend.url, "memory_capacity": backend.memory_budget_bytes,
                          "memory_reserve": 0, "ps_refresh_interval": 0.2, **overrides}, environ or {})


def scrape(running: RunningServer, host: str = "127.0.0.1") -> str:
    """The router's `/metrics` over HTTP, checked with Prometheus's own `promtool check metrics`."""
    with urllib.request.urlopen(f"http://{host}:{running.metrics_port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make tools` installs Debian's prometheus package"
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stderr.decode() + checked.stdout.decode()
    return body.decode()
