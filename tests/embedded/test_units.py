"""Small pure parts of the embedded backend, tested with tables."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import quantrouter.embedded as embedded
from quantrouter.embedded import LadderEntry, Registry
from quantrouter.embedded.errors import BadRequestError
from quantrouter.embedded.gguf_info import format_parameter_size
from quantrouter.embedded.scheduler import parse_keep_alive


@pytest.mark.parametrize(("value", "seconds"), [
    (0, 0.0), (30, 30.0), (2.5, 2.5), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25), ("10", 10.0),
    (-1, math.inf), ("-1m", math.inf),
])
def test_keep_alive_is_parsed_like_ollama(value: object, seconds: float) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", True, None, [1]])
def test_bad_keep_alive_is_a_bad_request(value: object) -> None:
    with pytest.raises(BadRequestError):
        parse_keep_alive(value)


@pytest.mark.parametrize(("count", "text"), [
    (8_030_261_248, "8.0B"), (7_000_000_000, "7B"), (268_098_176, "268.10M"), (135_000_000, "135M"),
    (12_345, "12K"), (999, "999"),
])
def test_parameter_size_matches_ollama_human_number(count: int, text: str) -> None:
    assert format_parameter_size(count) == text


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(embedded) if not name.startswith("_")}
    modules = {"cli", "engine", "errors", "exchange", "gguf_info", "ladder", "openai", "registry", "scheduler",
               "server", "wire"}
    assert set(embedded.__all__) == public - modules


def test_user_directory_models_are_tagged_from_metadata(tmp_path: Path, ladder: list[LadderEntry]) -> None:
    q8 = next(e for e in ladder if e.quant == "Q8_0")
    (tmp_path / "renamed-to-mislead-f16.gguf").symlink_to(q8.path)
    (tmp_path / "not-a-model.gguf").write_bytes(b"not gguf")
    registry = Registry.build([], [tmp_path])
    [entry] = list(registry)
    assert entry.name == "gemma-3:270m-q8_0"  # from general.basename, size_label and file_type
    assert entry.info.quant.name == "Q8_0" and entry.digest == q8.sha256
