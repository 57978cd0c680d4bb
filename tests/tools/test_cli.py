"""The tool subcommands: --help that explains, clear errors, exit codes."""

from __future__ import annotations

import json

import pytest

from quantrouter.cli import DEFAULT_NUM_PREDICT, build_parser, main
from quantrouter.embedded import EmbeddedServer
from tests.support import FAMILY


@pytest.mark.parametrize(("command", "phrases"), [
    ("recommend", ["--vram", "--params", "--context", "GB per billion parameters × 1.2", "Live"]),
    ("compare", ["--prompt", "--quants", "--plot", "temperature 0", "highest-precision", "logprobs"]),
    ("calibrate", ["--output", "serve --calibration FILE", "measured decode"]),
    ("ladder", ["Q8_0, Q4_K_M, Q4_K_S", "F16, BF16 or F32", "--embedded"]),
    ("variants", ["--backend", "measured", "quality prior"]),
    ("generate", ["--num-predict", "default 256", "-1: until the model stops"]),
])
def test_help_explains(command: str, phrases: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in phrases:
        assert phrase in text, f"{command} --help does not mention {phrase!r}"


def test_generate_and_route_send_a_bounded_length_unless_told() -> None:
    assert DEFAULT_NUM_PREDICT == 256  # what --help and the README promise
    parser = build_parser()
    for command in ("generate", "route"):
        assert parser.parse_args([command, FAMILY, *(["a prompt"] if command == "generate" else [])]).num_predict \
            == DEFAULT_NUM_PREDICT
    assert parser.parse_args(["generate", FAMILY, "a prompt", "--num-predict", "-1"]).num_predict == -1


def test_offline_recommend_prints_the_table_and_the_pick(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["recommend", "--vram", "8GiB", "--params", "8.03B", "--context", "8192", "--layers", "32",
                 "--kv-heads", "8", "--head-dim", "128"])
    out = capsys.readouterr().out
    assert code == 0
    assert "→ Q6_K is the highest-quality choice that fits" in out
    assert "Q4_K_M                     4.89    4.6 GiB    1.0 GiB     5.6 GiB  yes" in out


def test_recommend_without_a_mode_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend"]) == 1
    assert "give a FAMILY (live) or --vram and --params (offline)" in capsys.readouterr().err


def test_partial_architecture_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--vram", "8GiB", "--params", "7B", "--layers", "32"]) == 1
    assert "go together" in capsys.readouterr().err


def test_unknown_family_exits_1_naming_the_families(embedded_backend: EmbeddedServer,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "mistral:7b", "--prompt", "hi", "--ollama-host", embedded_backend.url]) == 1
    assert f"quantrouter compare: unknown family 'mistral:7b'; the backend holds: {FAMILY}" in capsys.readouterr().err


def test_ladder_of_a_quantized_source_exits_1(embedded_backend: EmbeddedServer,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ladder", "gemma3:270m-q8_0", "--ollama-host", embedded_backend.url]) == 1
    assert "gemma3:270m-q8_0 is Q8_0; Ollama quantizes only from F16" in capsys.readouterr().err


def test_ladder_rejects_a_target_ollama_cannot_make(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ladder", "x:1b-fp16", "--quants", "q5_K_M"]) == 1
    assert "quantizes only to Q8_0, Q4_K_M, Q4_K_S; Q5_K_M must be pulled as a tag" in capsys.readouterr().err


def test_unreachable_backend_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", FAMILY, "--prompt", "hi", "--ollama-host", "http://127.0.0.1:9"]) == 1
    assert "quantrouter compare: the backend is unreachable" in capsys.readouterr().err


def test_variants_straight_from_the_backend(embedded_backend: EmbeddedServer,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["variants", FAMILY, "--backend", embedded_backend.url, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    variants = body["families"][FAMILY]
    served = {e.name: e.size for e in embedded_backend.registry}
    assert {v["tag"]: v["size_bytes"] for v in variants} == served
    assert all(v["tokens_per_second"] > 0 and v["parameter_count"] > 0 for v in variants)
