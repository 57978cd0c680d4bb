"""GPUs, model ladders and the *true* speed model the simulated Ollama runs at.

The router never reads these truths: it sees Ollama's per-request figures, as in production. Facts come
from docs/quantization.md (cited per constant); "computed" marks arithmetic on cited numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantrouter.catalog import Architecture
from quantrouter.quant import QuantType, parse_quantization

GIB = 1 << 30
GB = 1_000_000_000

# Batch size of Ollama's compute-graph estimate (docs/quantization.md §3: num_batch 512).
GRAPH_BATCH = 512
# Per-GPU minimum Ollama keeps free on CUDA, 457 MiB (`ml/device.go` MinimumMemory, docs/quantization.md §3).
OLLAMA_MINIMUM_MEMORY = 457 << 20
# Layers spilled to the CPU stream from DDR: the router's own default for "no GPU" (throughput.DEFAULT_BANDWIDTH).
CPU_BANDWIDTH = 50e9
CPU_EFFICIENCY = 0.6


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU as the simulation runs it. `efficiency` and `overhead_s` are the truth the router must learn.

    overhead_s is the fixed per-token cost of a 32-layer model; it scales with the layer count.
    """

    name: str
    nvml_name: str
    capacity_bytes: int
    bandwidth: float
    efficiency: float
    overhead_s: float
    prompt_tps_8b: float
    load_bytes_per_s: float
    load_fixed_s: float


# H100 SXM: 80 GB, 3.35 TB/s (docs/quantization.md §6). η and c fitted to the H100 PCIe rows of §2 (LLaMA-2 7B
# q4_0 133.77 and f16 83.32 tok/s give 0.47 ms/GB + 5.7 ms, computed); CUDA graphs (#6766, +14 %) trim c.
H100 = GpuSpec("H100 SXM 80GB", "NVIDIA H100 80GB HBM3", 80 * GB, 3.35e12, efficiency=0.70, overhead_s=0.0050,
               prompt_tps_8b=12000.0, load_bytes_per_s=3.0e9, load_fixed_s=1.5)
# RTX 4090: 24 GB, 1,008 GB/s (§6). Llama-3 8B Q4_K_M 130.58 and F16 54.84 tok/s (§2, XiongjieDai) fit
# 1.04 ms/GB + 2.5 ms at η 0.95 (computed). pp512 Q4_K_M 7139 tok/s (§2).
RTX_4090 = GpuSpec("RTX 4090 24GB", "NVIDIA GeForce RTX 4090", 24 * GB, 1.008e12, efficiency=0.95, overhead_s=0.0025,
                   prompt_tps_8b=7139.0, load_bytes_per_s=2.0e9, load_fixed_s=1.0)

# Below ~4 bpw the dequantisation cost eats the smaller read: on an RTX 4080, Q2_K decodes no faster than
# Q4_K_S and Q3_K_S slower than Q4_K_M (docs/quantization.md §1c, §2 (iii)). Expressed as a loss of efficiency.
DEQUANT_EFFICIENCY = {"Q2_K": 0.55, "Q3_K_M": 0.75}


# Bytes per KV element by OLLAMA_KV_CACHE_TYPE (docs/quantization.md §3: f16 2 B, q8_0 34/32 B).
KV_ELEMENT_BYTES = {"f16": 2.0, "q8_0": 1.0625}
# Batched decode (OLLAMA_NUM_PARALLEL > 1): with b sequences in one batch each decodes at 1/b^β of its solo
# speed, so the runner's total rises as b^(1−β). β = 0.35 is an assumption (decode stays bandwidth bound: the
# weights are read once per step for the whole batch, the KV cache and sampling per sequence).
BATCH_SLOWDOWN_EXPONENT = 0.35
# The "efficiency" speed curve: achieved bandwidth grows with the bytes read per token, as the measured rows of
# docs/quantization.md §2 show (small/quantized models reach 25–75 % of peak, F16 80–91 %): η(W) = η·(W/W_ref)^γ,
# capped at η, with W_ref = the family's F16 file; γ = 0.3 is fitted by eye to those rows (computed).
EFFICIENCY_EXPONENT = 0.3


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """How the simulated Ollama differs from what the router assumes: one scenario dimension.

    `load_fraction`: the scheduler's fit threshold (80 % in `server/sched.go`; 95 % models a patched or newer
    scheduler). `kv_cache`: OLLAMA_KV_CACHE_TYPE, which changes what a runner holds but not what Ollama
    predicts (the prediction always assumes f16, docs/ollama.md §3). `curve`: "bandwidth" is
    t = W/(η·BW) + c; "efficiency" lets η grow with W (see EFFICIENCY_EXPONENT). `load_jitter`: lognormal σ
    of load times (page cache, disk contention).
    """

    name: str = "default"
    num_parallel: int = 1
    load_fraction: float = 0.8
    kv_cache: str = "f16"
    curve: str = "bandwidth"
    load_jitter: float = 0.0


DEFAULT_ENGINE = EngineSpec()
ENGINES = (
    DEFAULT_ENGINE,
    EngineSpec("parallel-2", num_parallel=2),
    EngineSpec("parallel-4", num_parallel=4),
    EngineSpec("fit-95%", load_fraction=0.95),
    EngineSpec("kv-q8_0", kv_cache="q8_0"),
    EngineSpec("efficiency-curve", curve="efficiency"),
    EngineSpec("load-jitter", load_jitter=0.4),
)


@dataclass(frozen=True, slots=True)
class VariantSpec:
    tag: str
    quant: QuantType
    size_bytes: int


@dataclass(frozen=True, slots=True)
class FamilySpec:
    name: str
    parameter_count: int
    architecture: Architecture
    head_count: int
    embedding_length: int
    vocab_size: int
    variants: tuple[VariantSpec, ...]
    quality_gap_scale: float = 1.0
    quality_source: str = "prior"

    def variant(self, tag: str) -> VariantSpec:
        return next(v for v in self.variants if v.tag == tag)

    def quality(self, tag: str) -> float:
        """The quality goodput is weighted by: the quant prior's gap to F16 scaled by `quality_gap_scale`."""
        return 1.0 - (1.0 - self.variant(tag).quant.quality) * self.quality_gap_scale

    def kv_bytes_per_token(self) -> int:
        return self.architecture.kv_cache_bytes(1)

    def graph_bytes(self, num_ctx: int) -> int:
        """Ollama's llama compute-graph estimate, full offload (docs/quantization.md §3)."""
        b, e, h, v = GRAPH_BATCH, self.embedding_length, self.head_count, self.vocab_size
        return max(4 * b * (1 + 4 * e + num_ctx * (1 + h)), 4 * b * (e + v))


def _ladder(family: str, sizes: dict[str, int]) -> tuple[VariantSpec, ...]:
    return tuple(VariantSpec(f"{family}-{name.lower()}", parse_quantization(name), size)
                 for name, size in sizes.items())


# Llama-3.1-8B: 8.03e9 parameters, 32 layers, 8 KV heads, head_dim 128, 32 heads, embedding 4096, vocab 128256
# (docs/quantization.md §1d, §3; docs/ollama.md §1 /api/show). Sizes: GiB column of the perplexity README (§1b).
LLAMA_8B = FamilySpec(
    "llama3.1:8b-instruct", 8_030_000_000, Architecture("llama", 32, 8, 128, 131072), 32, 4096, 128256,
    _ladder("llama3.1:8b-instruct", {name: int(gib * GIB) for name, gib in {
        "F16": 14.97, "Q8_0": 7.96, "Q6_K": 6.14, "Q5_K_M": 5.33, "Q4_K_M": 4.58, "Q3_K_M": 3.74, "Q2_K": 2.96,
    }.items()}),
)

# Llama-3.1-70B: 70.6e9 parameters, 80 layers, 8 KV heads, head_dim 128, 64 heads, embedding 8192 (its
# config.json, not in docs/). Sizes = parameters × the file bpw of docs/quantization.md §1d (computed).
LLAMA_70B_PARAMETERS = 70_600_000_000
LLAMA_70B = FamilySpec(
    "llama3.1:70b-instruct", LLAMA_70B_PARAMETERS, Architecture("llama", 80, 8, 128, 131072), 64, 8192, 128256,
    _ladder("llama3.1:70b-instruct", {name: parse_quantization(name).weights_bytes(LLAMA_70B_PARAMETERS)
                                      for name in ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")}),
    # Larger models lose less to quantization (an assumption, the direction llama.cpp's perplexity tables show
    # for 70B vs 8B): the truth halves the 8B prior's agreement gap, which the router does not know.
    quality_gap_scale=0.5, quality_source="prior, gap × 0.5 (stated perturbation)",
)


def ollama_predicted_bytes(family: FamilySpec, variant: VariantSpec, num_ctx: int,
                           engine: EngineSpec = DEFAULT_ENGINE) -> int:
    """What Ollama's scheduler predicts before a load: weights + f16 KV for num_ctx × OLLAMA_NUM_PARALLEL
    (`PredictServerVRAM`, docs/ollama.md §3), whatever the KV cache type."""
    return variant.size_bytes + family.architecture.kv_cache_bytes(num_ctx * engine.num_parallel)


def resident_bytes(family: FamilySpec, variant: VariantSpec, num_ctx: int, engine: EngineSpec = DEFAULT_ENGINE) -> int:
    """What a loaded runner really holds: weights, the KV cache at its real element size, the compute graph."""
    context = num_ctx * engine.num_parallel
    kv = family.architecture.kv_cache_bytes(context, KV_ELEMENT_BYTES[engine.kv_cache])
    return variant.size_bytes + kv + family.graph_bytes(context)


def seconds_per_token(gpu: GpuSpec, family: FamilySpec, variant: VariantSpec, context_tokens: float,
                      gpu_fraction: float = 1.0, engine: EngineSpec = DEFAULT_ENGINE) -> float:
    """True decode time per token alone on the GPU: bytes read / (η·BW) + c (docs/quantization.md §2).

    Bytes read = weights + the KV cache up to the current position; layers not offloaded stream from DDR.
    """
    eta = gpu.efficiency * DEQUANT_EFFICIENCY.get(variant.quant.name, 1.0)
    if engine.curve == "efficiency":
        reference = max(v.size_bytes for v in family.variants)
        eta *= min(1.0, (variant.size_bytes / reference) ** EFFICIENCY_EXPONENT)
    kv_scale = KV_ELEMENT_BYTES[engine.kv_cache] / KV_ELEMENT_BYTES["f16"]
    read = variant.size_bytes + context_tokens * family.kv_bytes_per_token() * kv_scale
    on_gpu = read * gpu_fraction / (eta * gpu.bandwidth)
    on_cpu = read * (1 - gpu_fraction) / (CPU_EFFICIENCY * CPU_BANDWIDTH)
    return on_gpu + on_cpu + gpu.overhead_s * family.architecture.block_count / 32


def prompt_tps(gpu: GpuSpec, family: FamilySpec) -> float:
    """Prompt processing is compute bound and roughly flat across quant types (§2): scale by parameters only."""
    return gpu.prompt_tps_8b * LLAMA_8B.parameter_count / family.parameter_count


def load_seconds(gpu: GpuSpec, variant: VariantSpec) -> float:
    return gpu.load_fixed_s + variant.size_bytes / gpu.load_bytes_per_s
