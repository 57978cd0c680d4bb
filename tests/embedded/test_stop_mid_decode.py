"""Stopping `quantrouter embedded serve` while llama.cpp is decoding, as `kubectl delete pod` or Ctrl-C would.

The server drains for `--drain-seconds`, then cancels the stream; the model may only be freed once its decoding
thread has let go of it (freeing it earlier crashed the process with SIGSEGV inside libggml-cpu).
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import ollama

from quantrouter.embedded import LadderEntry
from tests.hardening.helpers import LONG_PROMPT, backend_process
from tests.support import FAMILY

EXIT_TIMEOUT_S = 60.0
CHUNKS_BEFORE_STOP = 3
# Greedy on q4_0, the long prompt runs to the context limit (2,027 tokens at num_ctx 2048) without an end
# of turn, so only the stop can end it early; sampled at the default temperature it might stop on its own.
GREEDY = {"num_predict": 2000, "temperature": 0, "seed": 1}
# Short enough that no CPU decodes the rest of those 2,000 tokens within it: the 5 s default let a fast CI
# machine finish the whole answer before the cut, and the test then proved nothing.
DRAIN_S = 0.2


def test_sigterm_mid_decode_exits_cleanly_and_ends_the_stream(cache_dir: Path, ladder: list[LadderEntry]) -> None:
    with backend_process(cache_dir, drain_seconds=DRAIN_S) as backend, ollama.Client(host=backend.url) as client:
        stream = client.generate(model=f"{FAMILY}-q4_0", prompt=LONG_PROMPT, stream=True, options=GREEDY)
        received = 0
        finished = False
        try:
            for chunk in stream:
                received += 1
                finished = bool(chunk.done)
                if received == CHUNKS_BEFORE_STOP:
                    backend.signal(signal.SIGTERM)
        except (ollama.ResponseError, httpx.HTTPError):
            pass  # the server cut the stream short: what a stopping server may do
        assert backend.process is not None
        code = backend.process.wait(EXIT_TIMEOUT_S)
    assert received >= CHUNKS_BEFORE_STOP
    assert not finished, f"the answer ended on its own within a {DRAIN_S} s drain: the stop did not reach the stream"
    assert code == 0, f"the server exited with {code} (-11 is the segfault of freeing a model mid-decode)"
