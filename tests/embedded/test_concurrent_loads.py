"""Loads on several threads at once must leave the process's stdout and stderr where they were.

llama-cpp-python quiets a load by swapping file descriptors 1 and 2 to /dev/null and back; two
interleaved swaps used to strand the process's stdout in /dev/null (logs and a benchmark's report
vanished). The backend now takes loads in turn.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import ollama

from quantrouter.embedded import EmbeddedServer

VARIANTS = ("gemma3:270m-q8_0", "gemma3:270m-q6_K", "gemma3:270m-q5_K_M")
ROUNDS = 3


def _where(fd: int) -> tuple[int, int]:
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


def test_parallel_loads_keep_stdout_and_stderr(server: EmbeddedServer) -> None:
    before = (_where(1), _where(2))

    def load_then_unload(tag: str) -> tuple[str | None, str | None]:
        loaded = client.generate(model=tag, prompt="", keep_alive="1m").done_reason
        unloaded = client.generate(model=tag, prompt="", keep_alive=0).done_reason
        return loaded, unloaded

    with ollama.Client(host=server.url) as client, ThreadPoolExecutor(len(VARIANTS)) as pool:
        for _ in range(ROUNDS):
            assert list(pool.map(load_then_unload, VARIANTS)) == [("load", "unload")] * len(VARIANTS)
    assert (_where(1), _where(2)) == before
