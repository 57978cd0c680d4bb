"""The models the embedded server offers: Ollama-style tag → GGUF file, its metadata and digest."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from quantrouter.embedded.gguf_info import GGUFInfo, GGUFInfoError, read_gguf_info
from quantrouter.embedded.ladder import LadderEntry, file_sha256

__all__ = ["ModelEntry", "Registry", "derived_tag"]

_log = logging.getLogger(__name__)
GGUF_SUFFIX = ".gguf"
# Ollama fills in ":latest" for a name given without a tag (`types/model/name.go`).
DEFAULT_TAG = "latest"


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One served model: what `/api/tags` lists and `/api/show` describes."""

    name: str
    info: GGUFInfo
    size: int
    digest: str
    modified_at: datetime

    @property
    def path(self) -> Path:
        """The GGUF file llama.cpp loads."""
        return self.info.path

    def details(self) -> dict[str, object]:
        """Ollama's `ModelDetails`, the part shared by tags, ps and show."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.info.architecture,
            "families": [self.info.architecture],
            "parameter_size": self.info.parameter_size,
            "quantization_level": self.info.quant.name,
        }


def derived_tag(info: GGUFInfo) -> str:
    """`<basename>:<size label>-<quant>` from metadata, e.g. `gemma-3:270m-q8_0`, like library tags."""
    quant = info.quant.name[0].lower() + info.quant.name[1:]
    family = info.basename.lower().replace(" ", "-")
    return f"{family}:{info.size_label.lower()}-{quant}"


class Registry:
    """Tag lookup over the built ladder plus every `*.gguf` found in the user's model directories."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self._models: dict[str, ModelEntry] = {}
        for entry in entries:
            if entry.name in self._models:
                _log.warning("skipping %s: tag %s is already served by %s", entry.path, entry.name,
                             self._models[entry.name].path)
                continue
            self._models[entry.name] = entry

    @classmethod
    def build(cls, ladder: Iterable[LadderEntry], model_dirs: Iterable[Path] = ()) -> Registry:
        """The ladder (digests from its manifest) first, then user files (hashed here, once)."""
        entries = [_entry(e.tag, read_gguf_info(e.path), e.sha256) for e in ladder]
        for directory in model_dirs:
            for path in sorted(directory.glob(f"*{GGUF_SUFFIX}")):
                try:
                    info = read_gguf_info(path)
                except (GGUFInfoError, ValueError) as error:
                    _log.warning("skipping %s: %s", path, error)
                    continue
                entries.append(_entry(derived_tag(info), info, file_sha256(path)))
        return cls(entries)

    def get(self, name: str) -> ModelEntry | None:
        """The model for `name`, accepting a bare name as `<name>:latest` as Ollama does."""
        if ":" not in name:
            name = f"{name}:{DEFAULT_TAG}"
        return self._models.get(name)

    def remove(self, name: str) -> None:
        """Stop serving `name` (Ollama's delete); the file stays, being the ladder's shared cache."""
        self._models.pop(name, None)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)


def _entry(name: str, info: GGUFInfo, digest: str) -> ModelEntry:
    stat = info.path.stat()
    modified = datetime.fromtimestamp(stat.st_mtime).astimezone()
    return ModelEntry(name=name, info=info, size=stat.st_size, digest=digest, modified_at=modified)

