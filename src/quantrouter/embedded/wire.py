"""Ollama's JSON shapes: parsing request bodies and options, building responses (docs/ollama.md §1).

Field names, types and omissions follow ollama/ollama `api/types.go`; durations are nanoseconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from quantrouter.embedded.engine import GenerationResult, SamplingOptions
from quantrouter.embedded.errors import BadRequestError
from quantrouter.embedded.registry import ModelEntry
from quantrouter.embedded.scheduler import ResidentModel, parse_keep_alive

__all__ = [
    "RequestOptions",
    "final_metrics",
    "list_entry",
    "now_rfc3339",
    "parse_body",
    "parse_options",
    "prompt_messages",
    "ps_entry",
    "require_model",
]

_log = logging.getLogger(__name__)
# The smallest context Ollama allows (`server/routes.go` getRunner).
MIN_NUM_CTX = 4
_INT_OPTIONS = {"num_predict", "top_k", "seed", "num_ctx"}
_FLOAT_OPTIONS = {"temperature", "top_p", "min_p", "repeat_penalty"}
# Options Ollama accepts that have no effect on this backend: type-checked by Ollama, ignored here.
_IGNORED_OPTIONS = {"num_keep", "typical_p", "repeat_last_n", "presence_penalty", "frequency_penalty",
                    "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "draft_num_predict"}


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """A request's sampling options plus the load-time ones the scheduler needs."""

    sampling: SamplingOptions
    num_ctx: int
    keep_alive: float | None


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request; 400 for an empty body or bad JSON, as Ollama's handlers answer."""
    if not body.strip():
        raise BadRequestError("missing request body")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as error:
        raise BadRequestError(f"invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise BadRequestError(f"json: cannot unmarshal {type(data).__name__} into a request object")
    return data


def require_model(data: Mapping[str, Any]) -> str:
    """`model` (or the legacy `name`); 400 `model is required` when absent."""
    model = data.get("model") or data.get("name")
    if not model:
        raise BadRequestError("model is required")
    if not isinstance(model, str):
        raise BadRequestError("model must be a string")
    return model


def parse_options(data: Mapping[str, Any], entry: ModelEntry, default_num_ctx: int) -> RequestOptions:
    """`options` and `keep_alive`; num_ctx is clamped to the model's training context as Ollama does."""
    raw = data.get("options") or {}
    if not isinstance(raw, dict):
        raise BadRequestError("options must be an object")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key in _INT_OPTIONS:
            values[key] = int(_number(key, value))
        elif key in _FLOAT_OPTIONS:
            values[key] = float(_number(key, value))
        elif key == "stop":
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise BadRequestError('option "stop" must be of type array')
            values[key] = tuple(value)
        elif key not in _IGNORED_OPTIONS:
            _log.warning("invalid option provided: %s", key)  # Ollama's Options.FromMap skips it too
    num_ctx = values.pop("num_ctx", default_num_ctx)
    num_ctx = max(MIN_NUM_CTX, min(num_ctx, entry.info.context_length))
    sampling = SamplingOptions(**values, grammar=_grammar(data.get("format")))  # option names are field names
    keep_alive = data.get("keep_alive")
    return RequestOptions(sampling, num_ctx, None if keep_alive is None else parse_keep_alive(keep_alive))


def _grammar(value: object) -> str:
    """Ollama's `format` — absent or "" (free text), "json", or a JSON schema object — as a GBNF grammar
    that holds llama.cpp's sampling to it. A schema the converter cannot express is a 400 up front."""
    if value is None or value == "":
        return ""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if value == "json":
        return str(JSON_GBNF)
    if isinstance(value, dict):
        try:
            return str(json_schema_to_gbnf(json.dumps(value)))
        except Exception as error:  # the converter raises plain Exceptions for what it cannot express
            raise BadRequestError(f"format: cannot follow this JSON schema ({error})") from error
    raise BadRequestError(f'invalid format {value!r}: use "json" or a JSON schema object')


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequestError(f'option "{key}" must be of type number')
    return value


def prompt_messages(system: object, prompt: str) -> list[dict[str, str]]:
    """/api/generate runs the prompt through the model's template as one user turn, unless `raw`."""
    if not prompt:
        return []
    turns = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    return [*turns, {"role": "user", "content": prompt}]


def now_rfc3339() -> str:
    """`created_at`: RFC 3339 with the local offset, as Go's time.Time marshals."""
    return datetime.now().astimezone().isoformat()


def final_metrics(result: GenerationResult | None, total_ns: int, load_ns: int) -> dict[str, int]:
    """The final chunk's `Metrics`; zero values are left out (`omitempty` in `api/types.go`)."""
    metrics = {"total_duration": total_ns, "load_duration": load_ns}
    if result is not None:
        metrics |= {
            "prompt_eval_count": result.prompt_eval_count,
            "prompt_eval_duration": result.prompt_eval_duration_ns,
            "eval_count": result.eval_count,
            "eval_duration": result.eval_duration_ns,
        }
    return {key: value for key, value in metrics.items() if value}


def list_entry(entry: ModelEntry) -> dict[str, Any]:
    """One `/api/tags` model (`ListModelResponse`)."""
    return {
        "name": entry.name,
        "model": entry.name,
        "modified_at": entry.modified_at.isoformat(),
        "size": entry.size,
        "digest": entry.digest,
        "details": entry.details(),
    }


def ps_entry(model: ResidentModel) -> dict[str, Any]:
    """One `/api/ps` model (`ProcessModelResponse`): what llama.cpp allocated for it, all counted as "VRAM"."""
    return {
        "name": model.entry.name,
        "model": model.entry.name,
        "size": model.size,
        "digest": model.entry.digest,
        "details": model.entry.details(),
        "expires_at": model.expires_at.isoformat(),
        "size_vram": model.size,
        "context_length": model.num_ctx,
    }
