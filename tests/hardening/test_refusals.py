"""Requests the router refuses before anything reaches the backend, and the `other` label they leave.

Each test names the README failure-mode row (or Metrics claim) it proves.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from quantrouter.embedded import EmbeddedServer
from quantrouter.metrics import OTHER
from quantrouter.server import RunningServer, run_in_thread
from quantrouter.units import MiB
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from tests.hardening.helpers import generate_request, rich, sample
from tests.support import FAMILY, router_settings, scrape

TIMEOUT_S = 30.0
# Less than the smallest variant (Q2_K, ≈230 MiB of weights) needs: nothing fits.
TINY_CAPACITY = 64 * MiB
UNKNOWN_MODEL = "acme-unlisted-model:1b"
MODEL_LABELS = ("model_name", "target_model_name")


@pytest.fixture
def cramped(fresh_backend: EmbeddedServer) -> Iterator[RunningServer]:
    """A router told of 64 MiB in front of a backend with nothing loaded (a resident variant always fits)."""
    with run_in_thread(router_settings(fresh_backend, memory_capacity=TINY_CAPACITY), CollectorRegistry()) as r:
        yield r


def test_no_variant_fits_memory(cramped: RunningServer, fresh_backend: EmbeddedServer) -> None:
    """Row "No variant fits free GPU memory": RESOURCE_EXHAUSTED `NO_VARIANT_FITS_MEMORY`, each candidate's
    need against what is free, no retry hint, and nothing sent to the backend."""
    with grpc.insecure_channel(f"127.0.0.1:{cramped.port}") as channel, pytest.raises(grpc.RpcError) as raised:
        list(pb_grpc.RouterServiceStub(channel).Generate(generate_request(FAMILY), timeout=TIMEOUT_S))
    seen = rich(raised.value)
    assert (seen.code, seen.reason, seen.retry_delay) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                           "NO_VARIANT_FITS_MEMORY", None)
    for tag in (f"{FAMILY}-f16", f"{FAMILY}-q2_K"):
        assert f"{tag}: needs " in seen.message, seen.message
    assert "64.0 MiB free" in seen.message
    assert fresh_backend.resident() == [], "a refused request loaded a model"
    assert sample(cramped, "quantrouter_requests_total", model_name=FAMILY, target_model_name=OTHER,
                  quantization=OTHER, preference="balanced", code="RESOURCE_EXHAUSTED") == 1


def test_label_values_are_catalog_names_or_other(cramped: RunningServer) -> None:
    """Metrics: "label values come only from the discovered catalog, and an unknown model name becomes
    `other`". A request refused before a variant was chosen counts `other` as its variant; an unknown
    model is refused before it is counted, so its name is never a label value."""
    with grpc.insecure_channel(f"127.0.0.1:{cramped.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        for model in (FAMILY, UNKNOWN_MODEL, f"{FAMILY}-q9_9"):
            with pytest.raises(grpc.RpcError):
                list(stub.Generate(generate_request(model), timeout=TIMEOUT_S))
        listing = stub.ListVariants(pb.ListVariantsRequest(), timeout=TIMEOUT_S)
    tags = {v.tag for family in listing.families for v in family.variants}
    assert len(tags) == 8
    text = scrape(cramped)
    assert "acme" not in text and "q9_9" not in text
    seen = {sample_.labels[label] for family in text_string_to_metric_families(text) for sample_ in family.samples
            for label in MODEL_LABELS if label in sample_.labels}
    assert OTHER in seen and FAMILY in seen
    assert seen <= tags | {FAMILY, OTHER}, seen - tags - {FAMILY, OTHER}
