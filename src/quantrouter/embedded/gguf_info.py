"""What a GGUF file says about itself: architecture, size, quantization and attention shape.

Everything comes from the file's metadata, never from its name, because the name of a user's file is
free text while `general.file_type` is what llama.cpp wrote. The header is parsed here with the `gguf`
package's type table: `gguf.GGUFReader` took 12.7 s per Gemma file on this machine (it materialises
each of the 262k vocabulary strings), while skipping arrays we do not need takes well under a second.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gguf

from quantrouter.catalog import compute_graph_bytes
from quantrouter.quant import QuantType, by_file_type

__all__ = ["GGUFInfo", "GGUFInfoError", "format_parameter_size", "read_gguf_info"]

# Bytes per element of the f16 KV cache that llama.cpp allocates by default.
F16_BYTES = 2
_TOKEN_EMBEDDING = "token_embd.weight"
THOUSAND = 1_000
MILLION = 1_000_000
BILLION = 1_000_000_000

_T = TypeVar("_T")

MetadataValue = str | int | float | bool | list[Any] | None


class GGUFInfoError(ValueError):
    """A file that is not a GGUF model this backend can describe (missing or malformed keys)."""


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """The metadata a server needs to list, show, size and load one GGUF model."""

    path: Path
    architecture: str
    parameter_count: int
    file_type: int
    quant: QuantType
    block_count: int
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    context_length: int
    embedding_length: int
    vocab_size: int
    basename: str
    size_label: str
    chat_template: str | None
    scalars: Mapping[str, str | int | float | bool]
    array_keys: tuple[str, ...]

    @property
    def parameter_size(self) -> str:
        """Ollama's `details.parameter_size`, e.g. "268.10M"."""
        return format_parameter_size(self.parameter_count)

    def kv_cache_bytes(self, num_ctx: int) -> int:
        """f16 KV cache for `num_ctx` tokens: layers × ctx × kv heads × (key + value length) × 2 bytes.

        With key_length == value_length == head_dim this is Ollama's
        `2 * layers * kvHeads * headDim * numCtx * 2` (`llm/llama_server.go` PredictServerVRAM).
        """
        per_token = self.block_count * self.head_count_kv * (self.key_length + self.value_length)
        return per_token * num_ctx * F16_BYTES

    def estimated_bytes(self, file_size: int, num_ctx: int) -> int:
        """What a load should take before llama.cpp says: the file, the f16 KV cache, the compute graph."""
        graph = compute_graph_bytes(self.embedding_length, self.vocab_size, self.head_count, num_ctx)
        return file_size + self.kv_cache_bytes(num_ctx) + graph

    def model_info(self, *, verbose: bool = False) -> dict[str, MetadataValue]:
        """`/api/show` `model_info`: every metadata key; arrays only when verbose, else null (as Ollama)."""
        info: dict[str, MetadataValue] = dict(sorted(self.scalars.items()))
        info["general.parameter_count"] = self.parameter_count
        # GGUF's `[llm].vocab_size`, from the token embedding's shape where the file leaves the key out.
        info.setdefault(f"{self.architecture}.vocab_size", self.vocab_size)
        arrays = _read_arrays(self.path, self.array_keys) if verbose else {}
        for key in self.array_keys:
            info[key] = arrays.get(key)
        return info


def format_parameter_size(count: int) -> str:
    """Ollama's `format.HumanNumber`: 8030261248 → "8.0B", 268098176 → "268.10M"."""
    if count >= BILLION:
        number = count / BILLION
        return f"{number:.0f}B" if number.is_integer() else f"{number:.1f}B"
    if count >= MILLION:
        number = count / MILLION
        return f"{number:.0f}M" if number.is_integer() else f"{number:.2f}M"
    if count >= THOUSAND:
        return f"{count / THOUSAND:.0f}K"
    return str(count)


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read `path`'s metadata; raises GGUFInfoError when it is not GGUF or a required key is missing."""
    try:
        header = _read_header(path, with_arrays=False)
    except (OSError, ValueError, struct.error) as error:
        raise GGUFInfoError(f"{path}: not a readable GGUF file: {error}") from None
    scalars = {k: v for k, v in header.values.items() if k not in header.array_keys}
    array_keys = header.array_keys
    arch = _require(scalars, "general.architecture", str, path)
    head_count = _require(scalars, f"{arch}.attention.head_count", int, path)
    embedding_length = _require(scalars, f"{arch}.embedding_length", int, path)
    default_head_dim = embedding_length // head_count
    count = scalars.get("general.parameter_count")
    parameter_count = count if isinstance(count, int) else header.tensor_elements
    file_type = _require(scalars, "general.file_type", int, path)
    template = scalars.get("tokenizer.chat_template")
    return GGUFInfo(
        path=path,
        architecture=arch,
        parameter_count=parameter_count,
        file_type=file_type,
        quant=by_file_type(file_type),
        block_count=_require(scalars, f"{arch}.block_count", int, path),
        head_count=head_count,
        head_count_kv=_optional_int(scalars, f"{arch}.attention.head_count_kv", head_count),
        key_length=_optional_int(scalars, f"{arch}.attention.key_length", default_head_dim),
        value_length=_optional_int(scalars, f"{arch}.attention.value_length", default_head_dim),
        context_length=_require(scalars, f"{arch}.context_length", int, path),
        embedding_length=embedding_length,
        vocab_size=_optional_int(scalars, f"{arch}.vocab_size", header.vocab_size),
        basename=str(scalars.get("general.basename") or arch),
        size_label=str(scalars.get("general.size_label") or format_parameter_size(parameter_count)),
        chat_template=template if isinstance(template, str) else None,
        scalars=scalars,  # type: ignore[arg-type]  # arrays were split off above
        array_keys=array_keys,
    )


def _require(scalars: Mapping[str, object], key: str, kind: type[_T], path: Path) -> _T:
    value = scalars.get(key)
    if not isinstance(value, kind):
        raise GGUFInfoError(f"{path}: metadata key {key} is missing or not {kind.__name__}")
    return value


def _optional_int(scalars: Mapping[str, object], key: str, default: int) -> int:
    value = scalars.get(key)
    return value if isinstance(value, int) else default


def _read_arrays(path: Path, keys: tuple[str, ...]) -> dict[str, MetadataValue]:
    values = _read_header(path, with_arrays=True).values
    return {key: values[key] for key in keys if key in values}


@dataclass(frozen=True, slots=True)
class _Header:
    values: dict[str, MetadataValue]
    array_keys: tuple[str, ...]
    tensor_elements: int
    vocab_size: int  # rows of token_embd.weight (0 if absent)


_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H", gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q", gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


class _Cursor:
    """Little-endian reads over the memory-mapped header (GGUF v2/v3, `gguf-py/gguf/constants.py`)."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.offset)[0]
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        start, self.offset = self.offset, self.offset + length
        return self.data[start:self.offset].decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.unpack("<Q")
        self.offset += length

    def value(self, kind: int, keep: bool) -> MetadataValue:
        if kind == gguf.GGUFValueType.STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if kind == gguf.GGUFValueType.ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if not keep and item_kind in _SCALAR_FORMATS:
                self.offset += count * struct.calcsize(_SCALAR_FORMATS[item_kind])
                return None
            items = [self.value(item_kind, keep) for _ in range(count)]
            return items if keep else None
        scalar: str | int | float | bool = self.unpack(_SCALAR_FORMATS[gguf.GGUFValueType(kind)])
        return scalar


def _read_header(path: Path, *, with_arrays: bool) -> _Header:
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor = _Cursor(data)
        if cursor.unpack("<I") != gguf.GGUF_MAGIC:
            raise ValueError("bad magic")
        cursor.unpack("<I")  # version
        n_tensors, n_kv = cursor.unpack("<Q"), cursor.unpack("<Q")
        values: dict[str, MetadataValue] = {}
        array_keys: list[str] = []
        for _ in range(n_kv):
            key = cursor.string()
            kind = cursor.unpack("<I")
            if kind == gguf.GGUFValueType.ARRAY:
                array_keys.append(key)
            values[key] = cursor.value(kind, keep=with_arrays or kind != gguf.GGUFValueType.ARRAY)
        elements = vocab = 0
        for _ in range(n_tensors):
            name = cursor.string()
            dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
            if name == _TOKEN_EMBEDDING and len(dims) == 2:
                vocab = dims[1]  # ggml order: (embedding_length, vocabulary)
            cursor.unpack("<I")  # tensor type
            cursor.unpack("<Q")  # data offset
            elements += math.prod(dims)
    return _Header(values, tuple(array_keys), elements, vocab)
