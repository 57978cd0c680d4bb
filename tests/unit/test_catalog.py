"""Family grouping for Ollama's free-form tags, name resolution, residency and the KV-cache estimate."""

from __future__ import annotations

import pytest

from quantrouter.catalog import Architecture, CatalogSnapshot, Resolution, VariantInfo, build_catalog, family_name_of
from quantrouter.quant import parse_quantization
from quantrouter.units import GiB

# Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128 → 128 KiB of f16 KV per token (docs/quantization.md §3).
LLAMA_8B = Architecture("llama", block_count=32, head_count_kv=8, head_dim=128, context_length=131072)


@pytest.mark.parametrize(
    ("tag", "family"),
    [
        ("llama3.2:3b-instruct-q8_0", "llama3.2:3b-instruct"),
        ("llama3.2:3b-instruct-fp16", "llama3.2:3b-instruct"),
        ("llama3.1:8b-instruct-bf16", "llama3.1:8b-instruct"),
        ("llama3.2-vision:11b-instruct-q4_K_M", "llama3.2-vision:11b-instruct"),
        ("qwen2.5:7b-instruct-iq4_xs", "qwen2.5:7b-instruct"),
        ("gemma3:270m-q8_0", "gemma3:270m"),
        ("mybot:q4_K_M", "mybot"),
        ("hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M", "hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF"),
        ("llama3.2:latest", None),
        ("llama3.2", None),
        ("mybot:v2", None),
        ("qwen3:8b", None),
    ],
)
def test_family_name_of_strips_only_a_quantization_suffix(tag: str, family: str | None) -> None:
    assert family_name_of(tag) == family


def _variant(tag: str, quant: str = "Q4_K_M") -> VariantInfo:
    return VariantInfo(tag, "", parse_quantization(quant), 5 * GiB)


def _catalog() -> CatalogSnapshot:
    tags = {
        "llama3.2:3b-instruct-q8_0": ("Q8_0", ("llama", "3.2B")),
        "llama3.2:3b-instruct-q4_K_M": ("Q4_K_M", ("llama", "3.2B")),
        "llama3.2:latest": ("Q4_K_M", ("llama", "3.2B")),
        "llama3.1:8b-instruct-q4_K_M": ("Q4_K_M", ("llama", "8.0B")),
        "llama3.1:70b-instruct-q4_K_M": ("Q4_K_M", ("llama", "70.6B")),
        "llama3.1:latest": ("Q4_K_M", ("llama", "8.0B")),
        "mybot:q4_K_M": ("Q4_K_M", ("", "")),
        "mybot:latest": ("Q8_0", ("", "")),
        "support:latest": ("Q4_K_M", ("llama", "3.2B")),
    }
    variants = [_variant(tag, quant) for tag, (quant, _) in tags.items()]
    details = {tag: detail for tag, (_, detail) in tags.items()}
    aliases = {"support:latest": "llama3.2:3b-instruct", "chat": "llama3.2:3b-instruct"}
    return build_catalog(variants, details, aliases)


@pytest.mark.parametrize(
    ("family", "tags"),
    [
        ("llama3.2:3b-instruct",
         ["llama3.2:3b-instruct-q4_K_M", "llama3.2:3b-instruct-q8_0", "llama3.2:latest", "support:latest"]),
        # `latest` joins the 8B family only: the 70B tag has another parameter_size.
        ("llama3.1:8b-instruct", ["llama3.1:8b-instruct-q4_K_M", "llama3.1:latest"]),
        ("llama3.1:70b-instruct", ["llama3.1:70b-instruct-q4_K_M"]),
        # No details at all: the bare tag joins the one named family of its repository.
        ("mybot", ["mybot:latest", "mybot:q4_K_M"]),
    ],
)
def test_build_catalog_groups_free_form_tags(family: str, tags: list[str]) -> None:
    assert [v.tag for v in _catalog().family(family)] == tags


def test_build_catalog_lists_each_family_once() -> None:
    assert _catalog().families == ["llama3.1:70b-instruct", "llama3.1:8b-instruct", "llama3.2:3b-instruct", "mybot"]


@pytest.mark.parametrize(
    ("model", "resolution"),
    [
        ("llama3.2:3b-instruct", Resolution("llama3.2:3b-instruct")),
        ("llama3.2", Resolution("llama3.2:3b-instruct")),  # repository with one family
        ("chat", Resolution("llama3.2:3b-instruct")),  # alias for a family
        ("mybot", Resolution("mybot")),
        ("llama3.2:3b-instruct-q8_0", Resolution("llama3.2:3b-instruct", "llama3.2:3b-instruct-q8_0")),
        ("llama3.2:latest", Resolution("llama3.2:3b-instruct", "llama3.2:latest")),
        ("support:latest", Resolution("llama3.2:3b-instruct", "support:latest")),
        ("llama3.1", None),  # two families (8b, 70b) share the repository: ambiguous
        ("unknown:7b", None),
    ],
)
def test_resolve_names_a_family_or_pins_a_tag(model: str, resolution: Resolution | None) -> None:
    assert _catalog().resolve(model) == resolution


@pytest.mark.parametrize(
    ("tag", "family"),
    [("localhost:5000/mybot:q4_K_M", "localhost:5000/mybot"), ("localhost:5000/mybot", None),
     ("registry.local:443/team/llama:8b-q8_0", "registry.local:443/team/llama:8b")],
)
def test_a_registry_port_is_part_of_the_repository(tag: str, family: str | None) -> None:
    assert family_name_of(tag) == family


def test_models_behind_one_registry_host_stay_apart() -> None:
    """`a:latest` must not join `b`'s family because both live on localhost:5000 (a request for b would get a)."""
    tags = ["localhost:5000/a:latest", "localhost:5000/b:q4_K_M", "localhost:5000/b:latest"]
    catalog = build_catalog([_variant(t) for t in tags], dict.fromkeys(tags, ("llama", "8.0B")), {})
    assert [v.tag for v in catalog.family("localhost:5000/b")] == ["localhost:5000/b:latest",
                                                                   "localhost:5000/b:q4_K_M"]
    assert catalog.resolve("localhost:5000/a") == Resolution("localhost:5000/a:latest")
    assert catalog.resolve("localhost:5000/b") == Resolution("localhost:5000/b")


def test_an_alias_to_an_unknown_family_adds_no_name() -> None:
    catalog = build_catalog([_variant("mybot:q4_K_M")], {}, {"other": "nowhere"})
    assert catalog.resolve("other") is None


def test_with_residency_marks_resident_variants_with_their_vram() -> None:
    catalog = _catalog().with_residency({"mybot:q4_K_M": (6 * GiB, 8192)})
    by_tag = {v.tag: v for v in catalog.family("mybot")}
    assert (by_tag["mybot:q4_K_M"].resident, by_tag["mybot:q4_K_M"].vram_bytes,
            by_tag["mybot:q4_K_M"].resident_context) == (True, 6 * GiB, 8192)
    assert (by_tag["mybot:latest"].resident, by_tag["mybot:latest"].vram_bytes) == (False, 0)
    assert catalog.resolve("chat") == Resolution("llama3.2:3b-instruct"), "names survive the residency update"


@pytest.mark.parametrize(
    ("num_ctx", "bytes_per_element", "mib"),
    # docs/quantization.md §3 table: 2048 → 256 MiB, 8192 → 1024 MiB (f16), 8192 q8_0-like 1 B → 512 MiB.
    [(2048, 2.0, 256), (8192, 2.0, 1024), (131072, 2.0, 16384), (8192, 1.0, 512),
     (1 << 20, 2.0, 16384)],  # clamped to the 131072-token training context
)
def test_kv_cache_bytes_for_llama_3_1_8b(num_ctx: int, bytes_per_element: float, mib: int) -> None:
    assert LLAMA_8B.kv_cache_bytes(num_ctx, bytes_per_element) == mib << 20


def test_kv_cache_without_a_known_training_context_is_not_clamped() -> None:
    arch = Architecture("llama", 32, 8, 128, context_length=0)
    assert arch.kv_cache_bytes(262144) == 32 * GiB
