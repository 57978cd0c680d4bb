"""The embedded backend charges what llama.cpp allocated, and the router's estimate stays within 15 % of it.

The estimate comes from a real router's Route answer (its policy over `/api/tags` and `/api/show`); the
charged figure from `/api/ps` after a real llama.cpp load, for every rung at num_ctx 2048 and 8192.
"""

from __future__ import annotations

import ollama
import pytest
from prometheus_client import CollectorRegistry

from quantrouter.client import Options, RouterClient
from quantrouter.embedded import EmbeddedServer
from quantrouter.embedded.engine import parse_allocation
from quantrouter.server import run_in_thread
from quantrouter.units import MiB
from tests.support import FAMILY, router_settings

TOLERANCE = 0.15
CONTEXTS = (2048, 8192)
# What llama.cpp 0.3.x logged loading gemma-3-270m-q4_k_m.gguf at n_ctx 2048 on this machine (abridged).
LOAD_LOG = """\
load_tensors:          AMX model buffer size =   213.91 MiB
load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
llama_context:        CPU  output buffer size =     1.00 MiB
llama_kv_cache:        CPU KV buffer size =     6.00 MiB
llama_kv_cache: size =    6.00 MiB (  2048 cells,   3 layers,  1/1 seqs), K (f16):    3.00 MiB, V (f16):    3.00 MiB
llama_kv_cache:        CPU KV buffer size =    30.00 MiB
llama_kv_cache: size =   30.00 MiB (  2048 cells,  15 layers,  1/1 seqs), K (f16):   15.00 MiB, V (f16):   15.00 MiB
sched_reserve:        CPU compute buffer size =   514.50 MiB
"""


def test_allocation_sums_the_buffers_llama_cpp_reports() -> None:
    allocation = parse_allocation(LOAD_LOG, weights=246_587_904)
    assert (allocation.kv_cache, allocation.output, allocation.compute) == (36 * MiB, 1 * MiB, int(514.5 * MiB))
    assert allocation.total == 246_587_904 + 36 * MiB + 1 * MiB + int(514.5 * MiB)


def _router_estimates(server: EmbeddedServer, num_ctx: int) -> dict[str, int]:
    with run_in_thread(router_settings(server), CollectorRegistry()) as running, \
            RouterClient(f"127.0.0.1:{running.port}") as client:
        decision = client.route(FAMILY, prompt="Hi", options=Options(num_ctx=num_ctx))
    return {c.tag: c.memory_bytes for c in decision.candidates}


def _charged(client: ollama.Client, tag: str, num_ctx: int) -> int:
    client.generate(model=tag, prompt="", options={"num_ctx": num_ctx}, keep_alive="1m")
    listed = {m.model: m for m in client.ps().models}[tag]
    client.generate(model=tag, prompt="", keep_alive=0)
    assert listed.context_length == num_ctx and listed.size == listed.size_vram
    return int(listed.size or 0)


@pytest.mark.parametrize("num_ctx", CONTEXTS)
def test_router_estimate_is_within_15_percent_of_what_llama_cpp_allocated(server: EmbeddedServer,
                                                                          num_ctx: int) -> None:
    estimates = _router_estimates(server, num_ctx)
    assert len(estimates) == 8
    rows, worst = [], 0.0
    with ollama.Client(host=server.url) as client:
        for tag, estimate in sorted(estimates.items()):
            entry = server.registry.get(tag)
            assert entry is not None
            charged = _charged(client, tag, num_ctx)
            # llama.cpp's compute buffer is charged: well beyond the old file + KV cache formula.
            assert charged > entry.size + entry.info.kv_cache_bytes(num_ctx) + 256 * MiB
            difference = (estimate - charged) / charged
            worst = max(worst, abs(difference))
            rows.append(f"  {tag:<22} num_ctx {num_ctx:>5}: estimate {estimate / MiB:8.1f} MiB, "
                        f"charged {charged / MiB:8.1f} MiB, {difference:+.1%}")
    print("\n" + "\n".join(rows))
    assert worst <= TOLERANCE, "\n".join(rows)
