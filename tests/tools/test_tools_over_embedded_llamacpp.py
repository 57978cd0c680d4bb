"""The tools against the real embedded llama.cpp backend: real generation, real files, real errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from quantrouter.calibration import read_calibration, read_calibration_file
from quantrouter.catalog import VariantInfo, build_catalog
from quantrouter.cli import main
from quantrouter.client import RouterClient
from quantrouter.config import Settings, load_settings
from quantrouter.embedded import EmbeddedServer
from quantrouter.quant import parse_quantization
from quantrouter.server import RunningServer, run_in_thread
from quantrouter.tools import (
    CALIBRATION_PROMPTS,
    ToolError,
    build_embedded_ladder,
    build_ladder,
    calibrate_family,
    compare_variants,
    plot_comparison,
    read_catalog,
    target_tag,
)
from quantrouter.tools.quality import LLAMA_CPP_LOGITS, EvaluationText, evaluation_text
from quantrouter.units import MiB
from tests.support import FAMILY, router_settings

PROMPT = "The capital of France is"
TOKENS = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMITTED_CALIBRATION = Path(__file__).parents[2] / "bench" / "results" / "calibration-gemma3-270m.json"


@pytest.fixture
def settings(embedded_backend: EmbeddedServer) -> Settings:
    return load_settings({"ollama_host": embedded_backend.url, "memory_reserve": 0}, {})


def test_compare_runs_each_variant_and_the_reference(settings: Settings, tmp_path: Path) -> None:
    result = asyncio.run(compare_variants(settings, FAMILY, PROMPT, ["q4_K_M", "q2_K"], num_predict=TOKENS))
    assert result.reference == "gemma3:270m-f16"
    assert [r.variant.quant.name for r in result.results] == ["F16", "Q4_K_M", "Q2_K"]
    reference = result.results[0]
    assert reference.agreement == 1.0
    for r in result.results:
        assert 0 < r.run.eval_count <= TOKENS and r.run.text
        assert r.run.decode_tps > 0 and r.run.prompt_tps > 0
        assert r.run.load_seconds > 0, "each variant is unloaded first, so its load is cold"
        assert r.run.time_to_first_token >= r.run.load_seconds
        assert 0.0 <= r.agreement <= 1.0
        assert r.top_k_agreement is None  # the embedded backend returns no logprobs
    # Agreement is the share of the reference's greedy tokens a variant reproduces before it first
    # diverges. Even Q4_K_M, the ladder's source of F16, may diverge: F16 computes the same weights with
    # other arithmetic (Q4_K's dot products round activations to 8 bits), so close logits can swap.
    for r in result.results[1:]:
        shared = round(r.agreement * len(reference.run.tokens))
        assert r.run.tokens[:shared] == reference.run.tokens[:shared]
        if shared < min(len(r.run.tokens), len(reference.run.tokens)):
            assert r.run.tokens[shared] != reference.run.tokens[shared], "agreement stopped before a divergence"
    plot = tmp_path / "speed-vs-quality.png"
    plot_comparison(result, plot)
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_calibration_file_seeds_a_router(settings: Settings, embedded_backend: EmbeddedServer,
                                         tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    result = asyncio.run(calibrate_family(settings, FAMILY, path, ["q8_0"], prompts=CALIBRATION_PROMPTS[:2],
                                   num_predict=TOKENS))
    written = read_calibration(path)
    assert set(written) == {"gemma3:270m-f16", "gemma3:270m-q8_0"} == set(result.variants)
    for c in written.values():
        assert c.decode_tps > 0 and c.prompt_tps > 0 and c.load_seconds > 0 and c.samples == 2
        assert c.agreement is not None and 0 <= c.agreement <= 1
    assert written["gemma3:270m-f16"].agreement == 1.0

    with run_in_thread(router_settings(embedded_backend, calibration_file=path), CollectorRegistry()) as running, \
            RouterClient(f"127.0.0.1:{running.port}") as client:
        listed = {v.tag: v for v in client.list_variants(FAMILY).families[FAMILY]}
    for tag, c in written.items():
        assert listed[tag].measured and listed[tag].samples == 2
        assert listed[tag].tokens_per_second == pytest.approx(c.decode_tps)
    assert not listed["gemma3:270m-q2_K"].measured


def test_unknown_family_names_what_the_backend_holds(settings: Settings) -> None:
    with pytest.raises(ToolError, match=r"unknown family 'llama3\.1:8b'.*gemma3:270m"):
        asyncio.run(compare_variants(settings, "llama3.1:8b", PROMPT))


def test_a_quant_level_the_family_lacks_is_named(settings: Settings) -> None:
    with pytest.raises(ToolError, match="gemma3:270m has no Q4_K_S variant"):
        asyncio.run(compare_variants(settings, FAMILY, PROMPT, ["q4_K_S"]))


def test_ladder_refuses_a_quantized_source_through_show(settings: Settings) -> None:
    with pytest.raises(ToolError, match=r"gemma3:270m-q4_K_M is Q4_K_M; Ollama quantizes only from F16, BF16 or F32"):
        asyncio.run(build_ladder(settings, "gemma3:270m-q4_K_M", progress=False))


def test_ladder_on_a_backend_without_create_says_how_to_build_the_embedded_ladder(settings: Settings) -> None:
    with pytest.raises(ToolError, match=r"no create API.*quantrouter ladder --embedded"):
        asyncio.run(build_ladder(settings, "gemma3:270m-f16", progress=False))


def test_embedded_ladder_is_what_the_embedded_backend_serves(settings: Settings, cache_dir: Path) -> None:
    result = build_embedded_ladder(cache_dir, progress=False)
    catalog = asyncio.run(read_catalog(settings))
    served = {v.tag: v.size_bytes for v in catalog.family(FAMILY)}
    assert {r.tag: r.size_bytes for r in result.rungs} == served
    assert result.family == FAMILY and result.source == "gemma3:270m-f16"


def test_ladder_targets_join_the_source_family() -> None:
    source = "llama3.2:3b-instruct-fp16"
    tags = [target_tag(source, parse_quantization(q)) for q in ("Q8_0", "Q4_K_M", "Q4_K_S")]
    assert tags == ["llama3.2:3b-instruct-q8_0", "llama3.2:3b-instruct-q4_K_M", "llama3.2:3b-instruct-q4_K_S"]
    variants = [VariantInfo(t, "", parse_quantization(q), 1) for t, q in
                zip([source, *tags], ("F16", "Q8_0", "Q4_K_M", "Q4_K_S"), strict=True)]
    catalog = build_catalog(variants, {}, {})
    assert catalog.families == ["llama3.2:3b-instruct"]


def test_live_recommend_uses_real_sizes(settings: Settings, embedded_backend: EmbeddedServer,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["recommend", FAMILY, "--vram", "450MiB", "--reserve", "0", "--context", "2048",
                 "--ollama-host", embedded_backend.url, "--json"])
    assert code == 0
    body = json.loads(capsys.readouterr().out)
    catalog = asyncio.run(read_catalog(settings))
    sizes = {v.tag: v.size_bytes for v in catalog.family(FAMILY)}
    rows = {e["candidate"]["label"]: e for e in body["estimates"]}
    assert {tag: row["candidate"]["weights_bytes"] for tag, row in rows.items()} == sizes
    assert not any(row["candidate"]["kv_estimated"] for row in rows.values())
    assert body["budget_bytes"] <= 450 * MiB
    assert not rows["gemma3:270m-f16"]["fits"]  # 517 MiB of weights
    chosen = body["chosen"]
    if chosen is not None:
        assert chosen["fits"] and chosen["total_bytes"] <= body["budget_bytes"]


def _one_entry_text() -> EvaluationText:
    shipped = evaluation_text()
    return EvaluationText(shipped.entries[:1], shipped.provenance)


def test_quality_from_llama_cpp_logits_is_written_with_its_provenance(settings: Settings,
                                                                      embedded_backend: EmbeddedServer,
                                                                      tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    files = {entry.name: entry.path for entry in embedded_backend.registry}
    steps: list[str] = []

    def progress(total: int) -> Callable[[str], None]:
        steps.append(f"total {total}")
        return steps.append

    asyncio.run(calibrate_family(settings, FAMILY, path, ["q2_K"], prompts=CALIBRATION_PROMPTS[:1], num_predict=TOKENS,
                          quality=_one_entry_text(), gguf_files=files, progress=progress))
    written = read_calibration_file(path)
    assert steps == ["total 2", "gemma3:270m-f16", "gemma3:270m-q2_K"]
    assert written.reference == "gemma3:270m-f16" and written.quality_text == evaluation_text().provenance
    reference, q2 = (written.variants[t].quality for t in ("gemma3:270m-f16", "gemma3:270m-q2_K"))
    assert reference is not None and q2 is not None
    assert (reference.top1, reference.ppl_ratio, reference.method) == (1.0, pytest.approx(1.0), LLAMA_CPP_LOGITS)
    assert reference.kl_mean == pytest.approx(0.0, abs=1e-9)
    assert q2.positions == reference.positions > 20
    # Q2_K loses information: its distributions diverge and the reference's text becomes less likely.
    assert q2.kl_mean > 3 * q2.kl_stderr > 0 and q2.ppl_ratio > 1.0 and q2.top1 < 1.0


def test_quality_without_logits_or_logprobs_is_a_clear_error_and_keeps_the_file(settings: Settings,
                                                                                tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text("previous calibration\n")
    with pytest.raises(ToolError, match=r"returned no logprobs.*calibrate --quality --embedded"):
        asyncio.run(calibrate_family(settings, FAMILY, path, ["q2_K"], prompts=CALIBRATION_PROMPTS[:1],
                                     num_predict=TOKENS, quality=_one_entry_text()))
    assert path.read_text() == "previous calibration\n"


def test_committed_calibration_marks_quality_measured(embedded_backend: EmbeddedServer,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    measured = read_calibration(COMMITTED_CALIBRATION)
    assert len(measured) == 8 and all(c.quality is not None for c in measured.values())
    settings = router_settings(embedded_backend, calibration_file=COMMITTED_CALIBRATION)
    with run_in_thread(settings, CollectorRegistry()) as running, \
            RouterClient(f"127.0.0.1:{running.port}") as client:
        listed = client.list_variants(FAMILY).families[FAMILY]
        decision = client.route(FAMILY, prompt="Hi", preference="quality")
        assert main(["variants", FAMILY, "--target", f"127.0.0.1:{running.port}"]) == 0
    for v in listed:
        quality = measured[v.tag].quality
        assert v.quality_measured and quality is not None and v.quality == quality.top1
    assert all(c.quality_measured for c in decision.candidates)
    rows = [line for line in capsys.readouterr().out.splitlines() if "gemma3:270m-" in line]
    assert len(rows) == 8 and all(line.rstrip().endswith("measured") for line in rows)


def test_without_a_calibration_quality_is_the_prior(router: RunningServer) -> None:
    with RouterClient(f"127.0.0.1:{router.port}") as client:
        listed = client.list_variants(FAMILY).families[FAMILY]
    assert listed and not any(v.quality_measured for v in listed)
    assert all(v.quality == parse_quantization(v.quantization).quality for v in listed)
