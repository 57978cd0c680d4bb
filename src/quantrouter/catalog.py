"""Variants and families as Ollama reports them, grouped robustly.

Ollama tags are free-form (`llama3.2:3b-instruct-q8_0`, `llama3.2:latest`, `mybot:v2`), so a tag is
never parsed for its quantization: that comes from `details.quantization_level` (docs/ollama.md §4).
A family is the tag with its quantization suffix removed (`gemma3:270m-q8_0` → `gemma3:270m`); a tag
without one (`llama3.2:latest`) joins the one family of the same repository, `details.family` and
`parameter_size`, if there is exactly one. Aliases put custom models (made `FROM` a base with a
Modelfile) into a family, or give a family another name.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from quantrouter.quant import QuantType, quality_key

__all__ = [
    "Architecture",
    "CatalogSnapshot",
    "Resolution",
    "VariantInfo",
    "build_catalog",
    "compute_graph_bytes",
    "family_name_of",
]

# The quantization part of a library tag: `-q4_K_M`, `-fp16`, `-bf16`, `-iq4_xs`, `:q8_0`.
_QUANT_SUFFIX = re.compile(r"[-_:]?((?:i?q\d[\w]*)|fp16|f16|bf16|fp32|f32)$", re.IGNORECASE)


# llama.cpp's and Ollama's default batch (`n_batch`, `num_batch`), which sizes the compute buffer.
DEFAULT_BATCH = 512


@dataclass(frozen=True, slots=True)
class Architecture:
    """The numbers the KV-cache estimate needs, from `/api/show` model_info."""

    name: str
    block_count: int
    head_count_kv: int
    head_dim: int
    context_length: int

    # For the compute graph (`graph_bytes`); 0 where `/api/show` did not say (the graph is then left out).
    embedding_length: int = 0
    head_count: int = 0
    vocab_size: int = 0

    def kv_cache_bytes(self, num_ctx: int, bytes_per_element: float = 2.0) -> int:
        """2 (K and V) × layers × context × KV heads × head_dim × bytes (f16 = 2), as Ollama predicts."""
        context = min(num_ctx, self.context_length) if self.context_length else num_ctx
        return int(2 * self.block_count * context * self.head_count_kv * self.head_dim * bytes_per_element)

    def graph_bytes(self, num_ctx: int) -> int:
        """The compute buffer llama.cpp reserves beside weights and KV cache (`compute_graph_bytes`)."""
        if not self.vocab_size:
            return 0
        return compute_graph_bytes(self.embedding_length, self.vocab_size, self.head_count or self.head_count_kv,
                                   min(num_ctx, self.context_length) if self.context_length else num_ctx)

    def context_bytes(self, num_ctx: int) -> int:
        """Everything a load needs besides the weights: KV cache plus compute graph."""
        return self.kv_cache_bytes(num_ctx) + self.graph_bytes(num_ctx)


def compute_graph_bytes(embedding_length: int, vocab_size: int, head_count: int, num_ctx: int,
                        batch: int = DEFAULT_BATCH) -> int:
    """llama.cpp's compute buffer for one `batch` of a `num_ctx` context, as Ollama's estimator sizes it.

    Ollama `fs/ggml/ggml.go` GraphSize (reference/ollama.md §3): max(4·b·(1 + 4E + C·(1 + H)),
    4·b·(E + V)) with b = min(ctx, batch). The second term (the output logits of a batch) dominates
    small models with large vocabularies: Gemma 3 270M (E 640, V 262144) → 513 MiB, where llama.cpp
    reports a 514.5 MiB compute buffer.
    """
    b = min(num_ctx, batch)
    return max(4 * b * (1 + 4 * embedding_length + num_ctx * (1 + head_count)),
               4 * b * (embedding_length + vocab_size))


@dataclass(frozen=True, slots=True)
class VariantInfo:
    """One tag Ollama holds, with what `/api/tags`, `/api/show` and `/api/ps` said about it."""

    tag: str
    family: str
    quant: QuantType
    size_bytes: int
    parameter_count: int = 0
    architecture: Architecture | None = None
    resident: bool = False
    vram_bytes: int = 0
    resident_context: int = 0


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a requested model name means: a family, and the tag when it pinned one variant."""

    family: str
    pinned_tag: str | None = None


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    """Every known variant, grouped into families, plus the names that resolve to each family.

    Indexed once when built (a new snapshot follows every catalog change), so the request path looks
    families and tags up instead of scanning and sorting the variants each time.
    """

    variants: tuple[VariantInfo, ...] = ()
    names: Mapping[str, str] | None = None
    _by_family: Mapping[str, tuple[VariantInfo, ...]] = field(init=False, repr=False, compare=False)
    _best_first: Mapping[str, tuple[VariantInfo, ...]] = field(init=False, repr=False, compare=False)
    _by_tag: Mapping[str, VariantInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        grouped: dict[str, list[VariantInfo]] = defaultdict(list)
        for v in self.variants:
            grouped[v.family].append(v)
        object.__setattr__(self, "_by_family", {name: tuple(grouped[name]) for name in sorted(grouped)})
        object.__setattr__(self, "_best_first", {
            name: tuple(sorted(members, key=lambda v: (quality_key(v.quant), v.tag)))
            for name, members in self._by_family.items()})
        object.__setattr__(self, "_by_tag", {v.tag: v for v in self.variants})

    @property
    def families(self) -> list[str]:
        return list(self._by_family)

    def has_family(self, name: str) -> bool:
        return name in self._by_family

    def family(self, name: str) -> tuple[VariantInfo, ...]:
        return self._by_family.get(name, ())

    def best_first(self, name: str) -> tuple[VariantInfo, ...]:
        """The family's variants, highest quality first (ties by tag): the order listings show."""
        return self._best_first.get(name, ())

    def variant(self, tag: str) -> VariantInfo | None:
        return self._by_tag.get(tag)

    def resolve(self, model: str) -> Resolution | None:
        """An exact tag pins its variant; a family name, alias or bare repository names a family."""
        names = self.names or {}
        if model in names:
            return Resolution(names[model])
        pinned = self.variant(model)
        if pinned is not None:
            return Resolution(pinned.family, pinned.tag)
        return None

    def with_residency(self, resident: Mapping[str, tuple[int, int]]) -> CatalogSnapshot:
        """The same catalog with `/api/ps` applied: tag → (size_vram, context_length)."""
        variants = tuple(
            replace(v, resident=v.tag in resident, vram_bytes=resident.get(v.tag, (0, 0))[0],
                    resident_context=resident.get(v.tag, (0, 0))[1])
            for v in self.variants)
        return CatalogSnapshot(variants, self.names)


def _split_tag(tag: str) -> tuple[str, str]:
    """(repository, label); the label follows the last colon after the last slash, so a registry's
    `host:port/` prefix stays part of the repository."""
    repo, colon, label = tag.rpartition(":")
    if not colon or "/" in label:
        return tag, "latest"
    return repo, label or "latest"


def family_name_of(tag: str) -> str | None:
    """The family a tag's own name gives (`gemma3:270m-q8_0` → `gemma3:270m`), None without a quant suffix."""
    repo, label = _split_tag(tag)
    match = _QUANT_SUFFIX.search(label)
    if match is None:
        return None
    rest = label[: match.start()].rstrip("-_")
    return f"{repo}:{rest}" if rest else repo


@dataclass(frozen=True, slots=True)
class _Listed:
    tag: str
    family_key: tuple[str, str, str]
    own_family: str | None


def build_catalog(
    variants: Iterable[VariantInfo],
    details: Mapping[str, tuple[str, str]],
    aliases: Mapping[str, str],
) -> CatalogSnapshot:
    """Group variants into families.

    `details` maps tag → (`details.family`, `details.parameter_size`); `aliases` maps a tag to the family
    it belongs to, or an extra name to a family.
    """
    variants = list(variants)
    listed = []
    for v in variants:
        repo, _ = _split_tag(v.tag)
        arch_family, parameter_size = details.get(v.tag, ("", ""))
        listed.append(_Listed(v.tag, (repo, arch_family, parameter_size), family_name_of(v.tag)))
    named_by_key: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for item in listed:
        if item.own_family is not None:
            named_by_key[item.family_key][item.own_family] += 1

    family_of: dict[str, str] = {}
    for item in listed:
        if item.tag in aliases:
            family_of[item.tag] = aliases[item.tag]
        elif item.own_family is not None:
            family_of[item.tag] = item.own_family
        elif len(named_by_key[item.family_key]) == 1:
            family_of[item.tag] = next(iter(named_by_key[item.family_key]))
        else:
            family_of[item.tag] = item.tag

    grouped = tuple(sorted((replace(v, family=family_of[v.tag]) for v in variants), key=lambda v: v.tag))
    names: dict[str, str] = {f: f for f in family_of.values()}
    repos: dict[str, set[str]] = defaultdict(set)
    for family in family_of.values():
        repos[_split_tag(family)[0]].add(family)
    for repo, families in repos.items():
        if len(families) == 1 and repo not in names:
            names[repo] = next(iter(families))
    for alias, target in aliases.items():
        if alias not in family_of and target in names:
            names[alias] = names[target]
    return CatalogSnapshot(grouped, names)
