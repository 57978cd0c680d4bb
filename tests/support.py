"""Helpers shared by the tests (not fixtures: plain functions and constants)."""

from __future__ import annotations

import dataclasses

from quantrouter.config import Settings, load_settings
from quantrouter.embedded import EmbeddedServer

FAMILY = "gemma3:270m"


def router_settings(backend: EmbeddedServer, **overrides: object) -> Settings:
    """Settings for a router in front of `backend`, with the backend's budget as its static capacity."""
    base = load_settings({"grpc_address": "127.0.0.1:0", "metrics_address": "127.0.0.1:0",
                          "ollama_host": backend.url, "memory_capacity": backend.memory_budget_bytes,
                          "memory_reserve": 0, "ps_refresh_interval": 0.2}, {})
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
