"""The router end to end: gRPC over a socket → router → ollama client over HTTP → llama.cpp tokens."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from quantrouter.client import Constraints, Event, Options, RouterClient
from quantrouter.config import Settings
from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, run_embedded_in_thread
from quantrouter.quant import parse_quantization
from quantrouter.server import RunningServer, run_in_thread
from quantrouter.service import SERVICE_NAME
from quantrouter.units import MiB
from quantrouter.values import Completion, Decision
from tests.support import FAMILY, router_settings, scrape

SHORT = Options(num_predict=8, temperature=0.0, seed=1)
LONG_ANSWER = 1024
PROMPT = "The capital of France is"
# At the router's num_ctx 4096 a variant needs its file + 72 MiB KV + 513 MiB compute graph, loaded within
# 80 % of the free memory: every quantized variant fits (Q8_0 ≈ 863 MiB / 0.8), F16 (≈ 1103 MiB / 0.8) does not.
SMALL_BUDGET = 1200 * MiB


def collect(events: Iterator[Event]) -> tuple[list[Decision], str, Completion]:
    decisions, text, completion = [], [], None
    for event in events:
        if isinstance(event, Decision):
            assert not text, "a decision arrived after text"
            decisions.append(event)
        elif isinstance(event, Completion):
            completion = event
        else:
            text.append(event)
    assert completion is not None, "the stream ended without a completion"
    return decisions, "".join(text), completion


def test_health_is_serving(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_decision_comes_first_and_names_a_variant_that_exists(target: str) -> None:
    with RouterClient(target) as client:
        tags = {v.tag for v in client.list_variants(FAMILY).families[FAMILY]}
        first = next(iter(client.generate(FAMILY, PROMPT, options=SHORT)))
        assert isinstance(first, Decision)
        assert first.chosen is not None and first.chosen.tag in tags
        decisions, text, completion = collect(client.generate(FAMILY, PROMPT, options=SHORT))
    assert len(decisions) == 1 and decisions[0].chosen is not None
    assert completion.variant == decisions[0].chosen.tag
    assert text.strip(), "no text was generated"
    assert completion.generated_tokens > 0 and completion.tokens_per_second > 0
    assert completion.time_to_first_token > 0


def test_ladder_is_one_family_with_eight_variants(target: str) -> None:
    with RouterClient(target) as client:
        listing = client.list_variants()
    variants = listing.families[FAMILY]
    assert {v.quantization for v in variants} == {"F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M",
                                                    "Q2_K"}
    assert all(v.parameter_count > 200_000_000 for v in variants)
    assert listing.memory_source == "static"


def test_quality_picks_a_higher_quality_variant_than_latency(embedded_backend: EmbeddedServer) -> None:
    # A long answer, so decode speed rather than which variant happens to be loaded decides LATENCY:
    # for a few tokens a resident F16 rightly beats a cold load of a smaller file. A router of its own, so that no
    # other test's routings steer it (with `tight_arrivals` set, their gRPC deadlines could have callers expected
    # during F16's long decode on the CPU whose SLO bears no second runner, and hold F16 back behind a quicker one).
    long = Options(num_predict=LONG_ANSWER, temperature=0.0)
    with run_in_thread(router_settings(embedded_backend), CollectorRegistry()) as running, \
            RouterClient(f"127.0.0.1:{running.port}") as client:
        quality = client.route(FAMILY, prompt=PROMPT, preference="quality", options=long)
        latency = client.route(FAMILY, prompt=PROMPT, preference="latency", options=long)
        served, _, _ = collect(client.generate(FAMILY, PROMPT, preference="quality", options=SHORT))
    best, fast = quality.chosen, latency.chosen
    assert best is not None and fast is not None
    assert best.quantization == "F16", quality.reason
    assert parse_quantization(best.quantization).quality > parse_quantization(fast.quantization).quality
    assert served[0].chosen is not None and served[0].chosen.quantization == "F16"


def test_measured_speed_feeds_back_into_later_decisions(target: str) -> None:
    tag = "gemma3:270m-q6_K"
    with RouterClient(target) as client:
        before = next(c for c in client.route(FAMILY, prompt=PROMPT).candidates if c.tag == tag)
        _, _, completion = collect(client.generate(tag, PROMPT, options=SHORT))
        after = next(c for c in client.route(FAMILY, prompt=PROMPT).candidates if c.tag == tag)
    assert after.measured
    # The EWMA takes each sample with weight alpha; the first sample replaces the prior outright.
    alpha = Settings().policy.ewma_alpha
    expected = (alpha * completion.tokens_per_second + (1 - alpha) * before.tokens_per_second if before.measured
                else completion.tokens_per_second)
    assert after.tokens_per_second == pytest.approx(expected, rel=1e-6)


def test_pinning_an_exact_tag(target: str) -> None:
    with RouterClient(target) as client:
        decisions, _, completion = collect(client.generate("gemma3:270m-q4_0", PROMPT, preference="quality",
                                                           options=SHORT))
    assert decisions[0].pinned
    assert completion.variant == "gemma3:270m-q4_0"
    assert [c.tag for c in decisions[0].candidates] == ["gemma3:270m-q4_0"]


def test_constraints_filter_with_reasons(target: str) -> None:
    with RouterClient(target) as client:
        decision = client.route(FAMILY, preference="latency",
                                constraints=Constraints(min_quantization="Q6_K"))
    assert decision.chosen is not None
    assert parse_quantization(decision.chosen.quantization).quality >= parse_quantization("Q6_K").quality
    rejected = {c.tag: c.rejection for c in decision.candidates if not c.feasible}
    assert rejected["gemma3:270m-q2_K"] == "below min_quantization Q6_K"


def test_route_answers_what_generate_would_when_nothing_qualifies(target: str) -> None:
    impossible = Constraints(min_quantization="Q8_0", allowed_quantizations=("Q2_K",))
    with RouterClient(target) as client:
        for call in (lambda: client.route(FAMILY, constraints=impossible),
                     lambda: list(client.generate(FAMILY, PROMPT, options=SHORT, constraints=impossible))):
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
            assert "gemma3:270m-q2_K: below min_quantization Q8_0" in raised.value.details()  # type: ignore[attr-defined]


def test_a_default_floor_applies_unless_the_caller_sets_one(embedded_backend: EmbeddedServer) -> None:
    settings = router_settings(embedded_backend, default_min_quantization="Q4_K_M")
    with run_in_thread(settings, CollectorRegistry()) as running, \
            RouterClient(f"127.0.0.1:{running.port}") as client:
        floored = client.route(FAMILY, preference="latency")
        lowered = client.route(FAMILY, preference="latency", constraints=Constraints(min_quantization="Q2_K"))
    assert floored.chosen is not None and lowered.chosen is not None
    assert parse_quantization(floored.chosen.quantization).quality >= parse_quantization("Q4_K_M").quality
    assert {c.tag: c.rejection for c in floored.candidates}["gemma3:270m-q2_K"] == "below min_quantization Q4_K_M"
    # The caller's own floor replaces the default one (Q2_K may still be held back by the speed floor below
    # 4.5 bits/weight, which is not a floor the caller set).
    assert all("min_quantization" not in c.rejection for c in lowered.candidates)


def test_json_format_reaches_the_backend(target: str) -> None:
    with RouterClient(target) as client:
        _, text, _ = collect(client.generate(FAMILY, "A person as JSON:", preference="latency",
                                             options=Options(num_predict=24, temperature=0.0, format="json")))
    assert text.lstrip().startswith(("{", "[")), text


def test_chat_streams_through_the_same_routing(target: str) -> None:
    with RouterClient(target) as client:
        decisions, text, completion = collect(client.chat(
            FAMILY, [("user", "Say hello.")], preference="latency", options=SHORT))
    assert decisions[0].chosen is not None
    assert completion.generated_tokens > 0 and text


def test_unknown_model_is_not_found_with_error_info(target: str) -> None:
    with RouterClient(target) as client, pytest.raises(grpc.RpcError) as raised:
        list(client.generate("no-such-model:1b", PROMPT, options=SHORT))
    error = raised.value
    assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert FAMILY in error.details()  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None and any(d.type_url.endswith("ErrorInfo") for d in status.details)


def test_metrics_pass_promtool_and_carry_decisions(router: RunningServer, target: str) -> None:
    with RouterClient(target) as client:
        _, _, completion = collect(client.generate(FAMILY, PROMPT, preference="latency", options=SHORT))
    text = scrape(router)
    quant = completion.variant.rsplit("-", 1)[1].upper()
    assert (f'quantrouter_route_decisions_total{{model_name="{FAMILY}",preference="latency",'
            f'quantization="{quant}",reason="latency",target_model_name="{completion.variant}"}}') in text
    assert f'quantrouter_delivered_tokens_per_second_count{{model_name="{FAMILY}",quantization="{quant}",' \
           f'target_model_name="{completion.variant}"}}' in text
    assert 'quantrouter_gpu_memory_free_bytes{gpu="static",source="static"}' in text


@pytest.fixture
def small_budget_router(ladder: list[object], cache_dir: Path) -> Iterator[RunningServer]:
    config = EmbeddedConfig(cache_dir=cache_dir, memory_budget_bytes=SMALL_BUDGET)
    with run_embedded_in_thread(config) as backend, \
            run_in_thread(router_settings(backend), CollectorRegistry()) as running:
        yield running


def test_small_budget_quality_gets_the_best_variant_that_fits(small_budget_router: RunningServer) -> None:
    with RouterClient(f"127.0.0.1:{small_budget_router.port}") as client:
        decisions, _, completion = collect(client.generate(FAMILY, PROMPT, preference="quality", options=SHORT))
    decision = decisions[0]
    assert decision.downgraded
    assert completion.variant == "gemma3:270m-q8_0", decision.reason
    f16 = next(c for c in decision.candidates if c.tag == "gemma3:270m-f16")
    assert not f16.feasible and f16.rejection.startswith("needs ") and "free" in f16.rejection
    assert "downgraded from gemma3:270m-f16" in decision.reason


@pytest.fixture
def disappearing_ladder(ladder: list[object], cache_dir: Path, tmp_path: Path) -> Iterator[
        tuple[EmbeddedServer, Path]]:
    """A private copy of the ladder (hard links), so one variant's file can really be deleted."""
    models = tmp_path / "models"
    shutil.copytree(cache_dir / "models", models, copy_function=os.link,
                    ignore=shutil.ignore_patterns(".lock"))
    with run_embedded_in_thread(EmbeddedConfig(cache_dir=tmp_path, memory_budget_bytes=4 * 1024 * MiB)) as backend:
        yield backend, models


def test_fallback_when_the_chosen_variant_disappears(disappearing_ladder: tuple[EmbeddedServer, Path]) -> None:
    backend, models = disappearing_ladder
    with run_in_thread(router_settings(backend), CollectorRegistry()) as running, \
            RouterClient(f"127.0.0.1:{running.port}") as client:
        assert client.route(FAMILY, preference="quality").chosen.tag == "gemma3:270m-f16"  # type: ignore[union-attr]
        (models / "gemma-3-270m-f16.gguf").unlink()
        decisions, text, completion = collect(client.generate(FAMILY, PROMPT, preference="quality", options=SHORT))
        metrics = scrape(running)
    assert [d.chosen.tag for d in decisions if d.chosen] == ["gemma3:270m-f16", "gemma3:270m-q8_0"]
    assert decisions[1].fallback and not decisions[0].fallback
    assert "gemma3:270m-f16" in decisions[1].reason
    assert completion.variant == "gemma3:270m-q8_0" and text
    assert 'quantrouter_fallbacks_total{model_name="gemma3:270m"' in metrics
