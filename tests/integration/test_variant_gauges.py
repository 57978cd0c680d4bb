"""The per-variant gauges follow the backend: a variant deleted from it leaves `/metrics` too.

The backend is a private embedded server over the cached ladder, so deleting a tag from it
(`DELETE /api/delete` through the `ollama` client, as one would on Ollama) touches no other test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest
from prometheus_client import CollectorRegistry

from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, run_embedded_in_thread
from quantrouter.server import RunningServer, run_in_thread
from quantrouter.units import GiB
from tests.hardening.helpers import wait_for
from tests.support import FAMILY, router_settings, scrape

DELETED = f"{FAMILY}-q2_K"
KEPT = f"{FAMILY}-q4_0"
REFRESH_TIMEOUT_S = 20.0
VARIANT_GAUGES = ("quantrouter_variant_resident", "quantrouter_variant_vram_bytes",
                  "quantrouter_variant_tokens_per_second", "quantrouter_variant_breaker_open")


@pytest.fixture
def private_stack(ladder: list[object], cache_dir: Path) -> Iterator[tuple[EmbeddedServer, RunningServer]]:
    with run_embedded_in_thread(EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=2 * GiB)) as backend, \
            run_in_thread(router_settings(backend, tags_refresh_interval=0.2), CollectorRegistry()) as running:
        yield backend, running


def series(text: str, tag: str) -> dict[str, float]:
    """Every variant gauge's value for `tag` in an exposition (name → value)."""
    found = {}
    for name in VARIANT_GAUGES:
        match = re.search(rf'^{name}{{[^}}]*target_model_name="{re.escape(tag)}"[^}}]*}} (\S+)$', text, re.M)
        if match:
            found[name] = float(match.group(1))
    return found


def test_a_deleted_variant_leaves_the_gauges(private_stack: tuple[EmbeddedServer, RunningServer]) -> None:
    backend, running = private_stack
    with ollama.Client(host=backend.url) as client:
        client.generate(model=DELETED, prompt="")  # load it, as a request would
        wait_for(lambda: series(scrape(running), DELETED).get("quantrouter_variant_resident") == 1,
                 REFRESH_TIMEOUT_S, f"{DELETED} to be exported as resident")
        assert set(series(scrape(running), DELETED)) == set(VARIANT_GAUGES)

        assert client.delete(DELETED).status == "success"
        assert DELETED not in {m.model for m in client.list().models}
        assert not any(m.model == DELETED for m in client.ps().models), "a deleted model stays loaded"
        with pytest.raises(ollama.ResponseError) as raised:
            client.delete(DELETED)
        assert raised.value.status_code == 404

    wait_for(lambda: not series(scrape(running), DELETED), REFRESH_TIMEOUT_S, f"{DELETED}'s series to go")
    text = scrape(running)
    assert set(series(text, KEPT)) == set(VARIANT_GAUGES), "the other variants must stay"
    assert running.registry.get_sample_value("quantrouter_variant_resident", {
        "model_name": FAMILY, "target_model_name": DELETED, "quantization": "Q2_K"}) is None
