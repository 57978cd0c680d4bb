"""`ladder`: create the variants a backend can quantize to itself, named so the catalog groups them.

Ollama's `create` with `quantize` makes only Q8_0, Q4_K_M and Q4_K_S, and only from F16, BF16 or F32
weights (docs/ollama.md §4, `server/create.go`); the source is checked through `/api/show` first,
so a wrong source fails with what to do instead of after a download. Targets are named
`<family>-<quant>` (`llama3.2:3b-instruct-fp16` → `llama3.2:3b-instruct-q8_0`), the spelling
`catalog.family_name_of` strips, so the new variants join the source's family.

The embedded backend has no `create`; it serves the full llama.cpp ladder (F16 … Q2_K), which
`build_embedded_ladder` builds with the embedded package's own `prepare_ladder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantrouter.backend import ollama_client, translated
from quantrouter.catalog import family_name_of
from quantrouter.config import Settings
from quantrouter.errors import BackendModelMissing
from quantrouter.quant import QuantType, UnknownQuantizationError, by_file_type, parse_quantization
from quantrouter.tools.errors import ToolError
from quantrouter.units import format_bytes

__all__ = [
    "OLLAMA_QUANTIZE_TARGETS",
    "QUANTIZABLE_SOURCES",
    "LadderResult",
    "Rung",
    "build_embedded_ladder",
    "build_ladder",
    "check_source",
    "format_ladder",
    "ladder_targets",
    "target_tag",
]

# `fs/ggml/type.go` ParseFileType and `server/create.go` (docs/ollama.md §4).
OLLAMA_QUANTIZE_TARGETS: tuple[QuantType, ...] = tuple(parse_quantization(n) for n in ("Q8_0", "Q4_K_M", "Q4_K_S"))
QUANTIZABLE_SOURCES = frozenset({"F16", "BF16", "F32"})
CREATED, EXISTS, BUILT = "created", "already there", "built"


@dataclass(frozen=True, slots=True)
class Rung:
    tag: str
    quant: str
    size_bytes: int
    status: str


@dataclass(frozen=True, slots=True)
class LadderResult:
    source: str
    family: str
    rungs: tuple[Rung, ...]


def check_source(tag: str, quant: QuantType) -> None:
    """Raise a `ToolError` that says what to do when `quant` weights cannot be quantized by Ollama."""
    if quant.name in QUANTIZABLE_SOURCES:
        return
    family = family_name_of(tag) or tag
    raise ToolError(
        f"{tag} is {quant.name}; Ollama quantizes only from F16, BF16 or F32 weights. Pull or import an "
        f"unquantized source (e.g. `ollama pull {family}-fp16`, or a Modelfile `FROM ./model-f16.gguf` with "
        f"`ollama create`) and run `quantrouter ladder` on that tag; other levels are published as tags to pull "
        f"(`ollama pull {family}-q5_K_M`). For the embedded backend, `quantrouter ladder --embedded` builds "
        "its full llama.cpp ladder.")


def target_tag(source_tag: str, quant: QuantType) -> str:
    """`<family>-<quant>` in the library's spelling (lowercase `q`, the rest kept: `q4_K_M`)."""
    family = family_name_of(source_tag) or source_tag
    return f"{family}-{quant.name[0].lower()}{quant.name[1:]}"


def ladder_targets(quants: Sequence[str] = ()) -> tuple[QuantType, ...]:
    """The requested targets (all three by default); anything else is an error naming the three."""
    if not quants:
        return OLLAMA_QUANTIZE_TARGETS
    allowed = ", ".join(q.name for q in OLLAMA_QUANTIZE_TARGETS)
    targets = []
    for text in quants:
        try:
            quant = parse_quantization(text)
        except UnknownQuantizationError as error:
            raise ToolError(str(error)) from None
        if quant not in OLLAMA_QUANTIZE_TARGETS:
            raise ToolError(f"Ollama's create quantizes only to {allowed}; {quant.name} must be pulled as a tag")
        targets.append(quant)
    return tuple(dict.fromkeys(targets))


def _source_quant(shown: Any) -> QuantType:
    info = shown.modelinfo or {}
    file_type = info.get("general.file_type")
    level = shown.details.quantization_level if shown.details else None
    try:
        return by_file_type(int(file_type)) if isinstance(file_type, int) else parse_quantization(level or "")
    except UnknownQuantizationError as error:
        raise ToolError(f"cannot tell the source's quantization: {error}") from None


def _tqdm_progress(tag: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        raise ToolError("progress bars need tqdm (pip install tqdm); or pass --quiet") from None

    return tqdm(desc=tag, unit="B", unit_scale=True, unit_divisor=1024, leave=True)


async def build_ladder(settings: Settings, source: str, quants: Sequence[str] = (), *, force: bool = False,
                       progress: bool = True, host: str | None = None) -> LadderResult:
    """Check `source`, then `create` each missing target with `quantize`, showing Ollama's progress."""
    targets = ladder_targets(quants)
    backend = settings.backend.at(host)
    client = ollama_client(backend)
    try:
        with translated(source):
            shown = await client.show(source)
        check_source(source, _source_quant(shown))
        with translated():
            held = {m.model: int(m.size or 0) for m in (await client.list()).models}
        rungs = []
        for quant in targets:
            tag = target_tag(source, quant)
            if tag in held and not force:
                rungs.append(Rung(tag, quant.name, held[tag], EXISTS))
                continue
            await _create(client, source, tag, quant, progress, backend.host)
            with translated(tag):
                size = next((int(m.size or 0) for m in (await client.list()).models if m.model == tag), 0)
            rungs.append(Rung(tag, quant.name, size, CREATED))
    finally:
        await client.close()  # type: ignore[no-untyped-call]
    return LadderResult(source, family_name_of(source) or source, tuple(rungs))


async def _create(client: Any, source: str, tag: str, quant: QuantType, progress: bool, host: str) -> None:
    bar = _tqdm_progress(tag) if progress else None
    try:
        with translated(tag):
            stream = await client.create(model=tag, from_=source, quantize=quant.name, stream=True)
            async for part in stream:
                if bar is not None:
                    if part.total and bar.total != part.total:
                        bar.reset(total=part.total)
                    if part.completed is not None:
                        bar.n = part.completed
                    bar.set_postfix_str(part.status or "")
                    bar.refresh()
    except BackendModelMissing:
        raise ToolError(f"the backend at {host} has no create API (/api/create answered 404). The quantrouter "
                        "embedded backend is one such: build its ladder with `quantrouter ladder --embedded`") from None
    finally:
        if bar is not None:
            bar.close()


def build_embedded_ladder(cache_dir: Path, *, progress: bool = True) -> LadderResult:
    """The embedded backend's full llama.cpp ladder, built (or verified) under `cache_dir`."""
    from quantrouter.embedded import prepare_ladder

    entries = prepare_ladder(cache_dir, progress=progress)
    source = entries[0].tag
    return LadderResult(source, family_name_of(source) or source,
                        tuple(Rung(e.tag, e.quant, e.size, BUILT) for e in entries))


def format_ladder(result: LadderResult) -> str:
    lines = [f"{result.family} (from {result.source})"]
    lines += [f"  {r.tag:<32} {r.quant:<7} {format_bytes(r.size_bytes):>10}  {r.status}" for r in result.rungs]
    return "\n".join(lines)
