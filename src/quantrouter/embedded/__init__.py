"""An Ollama-compatible server over llama.cpp, serving a quantization ladder of Gemma 3 270M.

quantrouter talks to it exactly as it talks to Ollama, so tests and laptops without a GPU or an
Ollama install still run real generation over the real protocol (docs/design.md §8).
"""

from quantrouter.embedded.errors import (
    BadRequestError,
    EmbeddedError,
    ModelLoadError,
    ModelNotFoundError,
    ServerBusyError,
)
from quantrouter.embedded.gguf_info import GGUFInfo, read_gguf_info
from quantrouter.embedded.ladder import LADDER, LadderEntry, LadderError, prepare_ladder
from quantrouter.embedded.registry import ModelEntry, Registry
from quantrouter.embedded.scheduler import ResidentModel, parse_keep_alive
from quantrouter.embedded.server import EmbeddedConfig, EmbeddedServer, run_embedded_in_thread

__all__ = [
    "LADDER",
    "BadRequestError",
    "EmbeddedConfig",
    "EmbeddedError",
    "EmbeddedServer",
    "GGUFInfo",
    "LadderEntry",
    "LadderError",
    "ModelEntry",
    "ModelLoadError",
    "ModelNotFoundError",
    "Registry",
    "ResidentModel",
    "ServerBusyError",
    "parse_keep_alive",
    "prepare_ladder",
    "read_gguf_info",
    "run_embedded_in_thread",
]
