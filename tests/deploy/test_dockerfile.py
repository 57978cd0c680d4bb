"""The Dockerfile lints clean and keeps the image rules of docs/conventions.md §6. There is no
container engine on CI machines, so its structure is checked stage by stage instead of by a build."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
BASE_IMAGE = "python:3.11-slim-bookworm"
BUILD_TOOLS = re.compile(r"\b(?:apt-get|build-essential|gcc|g\+\+|cmake|make)\b")


def stages() -> dict[str, list[str]]:
    """Instructions per stage name, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = result.setdefault(line.split()[-1], [])
        current.append(line)
    return result


def instruction(stage: list[str], name: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in stage if line.startswith(name + " ")]


def test_hadolint_passes(tool: Any) -> None:
    result = tool("hadolint", "--no-color", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_pinned_slim_python() -> None:
    assert f"ARG PYTHON_IMAGE={BASE_IMAGE}" in DOCKERFILE.read_text()


def test_default_target_is_the_router_without_llama_cpp() -> None:
    everything = stages()
    *_, (name, last) = everything.items()
    assert name == "production"
    copied = " ".join(instruction(last, "COPY"))
    assert "--from=builder " in copied and "embedded" not in copied


def test_runtime_images_run_as_numeric_non_root_in_exec_form() -> None:
    everything = stages()
    base = everything["runtime-base"]
    assert json.loads(instruction(base, "ENTRYPOINT")[-1]) == ["quantrouter"]
    assert json.loads(instruction(base, "CMD")[-1]) == ["serve"]
    assert any("PYTHONUNBUFFERED=1" in env for env in instruction(base, "ENV"))
    for name in ("production", "embedded"):
        user = instruction(everything[name], "USER")[-1]
        assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"{name}: USER {user} must be numeric and not root"


def test_no_build_tools_in_runtime_images() -> None:
    everything = stages()
    for name in ("runtime-base", "production", "embedded"):
        for line in everything[name]:
            assert not BUILD_TOOLS.search(line), f"{name}: {line}"


def test_embedded_target_builds_llama_cpp_and_the_ladder_at_build_time() -> None:
    builder = " ".join(stages()["embedded-builder"])
    assert "build-essential" in builder
    assert "[gpu,embedded]" in builder
    assert "quantrouter embedded prepare" in builder
    assert "--from=embedded-builder" in " ".join(instruction(stages()["embedded"], "COPY"))


def test_build_context_holds_what_the_builder_copies() -> None:
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*", "the context is an allow-list"
    for line in instruction(stages()["builder"], "COPY"):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: missing from the repository"
            assert f"!{source.rstrip('/')}" in {entry.rstrip("/") for entry in ignore}, (
                f"COPY {source}: excluded by .dockerignore")
