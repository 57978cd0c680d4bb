"""What the picker reads from an HTTP inference request, and how it writes the body back.

Four APIs carry a JSON body with a `model`: Ollama's `/api/generate` and `/api/chat`, and the
OpenAI-compatible `/v1/chat/completions` and `/v1/completions`. The caller's wishes come from headers
(`x-quantrouter-preference`, `-min-quantization`, `-allowed-quantizations`, `-min-tokens-per-second`, and
the Gateway API Inference Extension's SLO hints `x-slo-ttft-ms`, `x-slo-tpot-ms`) or from a `+preference`
suffix on the model name (`gemma3:270m+latency`). The request is turned into the node router's own
protobuf request and checked by its `RequestReader`, so HTTP callers meet the same rules, in the same
words, as gRPC callers. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from quantrouter.v1 import router_service_pb2 as pb

__all__ = [
    "API_PATHS",
    "BODY_CHUNK_BYTES",
    "HttpRefusal",
    "InferenceCall",
    "read_call",
    "rewritten_body",
]

# Envoy's ext_proc takes streamed body mutations of at most this many bytes each (fleet.md, as llm-d sends).
BODY_CHUNK_BYTES = 62_000
API_PATHS = {"/api/generate": "generate", "/api/chat": "chat", "/v1/chat/completions": "chat",
             "/v1/completions": "generate"}
PREFERENCE_HEADER = "x-quantrouter-preference"
MIN_QUANT_HEADER = "x-quantrouter-min-quantization"
ALLOWED_QUANTS_HEADER = "x-quantrouter-allowed-quantizations"
MIN_TPS_HEADER = "x-quantrouter-min-tokens-per-second"
SLO_TTFT_HEADER = "x-slo-ttft-ms"
SLO_TPOT_HEADER = "x-slo-tpot-ms"
PREFERENCE_SEPARATOR = "+"
_PREFERENCES = {"quality": pb.PREFERENCE_QUALITY, "balanced": pb.PREFERENCE_BALANCED,
                "latency": pb.PREFERENCE_LATENCY}
# OpenAI roles with no Ollama twin, read as the nearest one for the routing estimate only.
_ROLES = {"developer": "system", "tool": "user", "function": "user"}
_OPENAI_OPTIONS = {"max_tokens": "num_predict", "max_completion_tokens": "num_predict"}
_OLLAMA_OPTIONS = ("num_predict", "num_ctx", "temperature", "top_p", "top_k", "seed")


class HttpRefusal(Exception):
    """A request the picker answers itself, with `status` and a JSON error body; `reason` is a metric label."""

    def __init__(self, status: HTTPStatus, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class InferenceCall:
    """One request as the picker routes it: the node router's protobuf request and the body to rewrite."""

    path: str
    kind: str
    model: str
    body: dict[str, Any]
    request: pb.GenerateRequest | pb.ChatRequest


def _bad(message: str) -> HttpRefusal:
    return HttpRefusal(HTTPStatus.BAD_REQUEST, "bad_request", message)


def _number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _bad(f"header {name}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise _bad(f"header {name}: must be a positive number, got {raw!r}")
    return value


def _constraints(headers: Mapping[str, str]) -> pb.Constraints:
    constraints = pb.Constraints(min_quantization=headers.get(MIN_QUANT_HEADER, "").strip())
    allowed = headers.get(ALLOWED_QUANTS_HEADER, "")
    constraints.allowed_quantizations.extend(q.strip() for q in allowed.split(",") if q.strip())
    min_tps = _number(headers, MIN_TPS_HEADER) or 0.0
    tpot_ms = _number(headers, SLO_TPOT_HEADER)
    if tpot_ms is not None:
        min_tps = max(min_tps, 1000.0 / tpot_ms)  # a time per output token is a floor on tokens per second
    constraints.min_tokens_per_second = min_tps
    ttft_ms = _number(headers, SLO_TTFT_HEADER)
    if ttft_ms is not None:
        constraints.max_time_to_first_token.FromNanoseconds(int(ttft_ms * 1e6))
    return constraints


def _preference(model: str, headers: Mapping[str, str]) -> tuple[str, int]:
    """The model without its `+preference` suffix, and the preference (header over suffix, else balanced)."""
    base, separator, suffix = model.rpartition(PREFERENCE_SEPARATOR)
    name = headers.get(PREFERENCE_HEADER, "").strip().lower()
    if separator:
        if suffix.lower() not in _PREFERENCES:
            raise _bad(f"model {model!r}: unknown preference suffix {suffix!r}; use +quality, +balanced or +latency")
        model, name = base, name or suffix.lower()
    if name and name not in _PREFERENCES:
        raise _bad(f"header {PREFERENCE_HEADER}: {name!r} is not quality, balanced or latency")
    return model, _PREFERENCES.get(name, pb.PREFERENCE_UNSPECIFIED)


def _options(body: Mapping[str, Any]) -> pb.GenerationOptions:
    raw = body.get("options") or {}
    if not isinstance(raw, dict):
        raise _bad("options must be an object")
    values = {name: raw[name] for name in _OLLAMA_OPTIONS if raw.get(name) is not None}
    values |= {ours: body[theirs] for theirs, ours in _OPENAI_OPTIONS.items() if body.get(theirs) is not None}
    values |= {name: body[name] for name in ("temperature", "top_p", "seed") if body.get(name) is not None}
    stop = raw.get("stop", body.get("stop"))
    try:
        options = pb.GenerationOptions(**values)
        if stop is not None:
            options.stop.extend([stop] if isinstance(stop, str) else stop)
    except (TypeError, ValueError) as error:
        raise _bad(f"options: {error}") from None
    return options


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _messages(body: Mapping[str, Any]) -> list[pb.ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _bad("messages must be an array of objects")
    return [pb.ChatMessage(role=_ROLES.get(str(m.get("role")), str(m.get("role", ""))), content=_text(m.get("content")))
            for m in messages]


def read_call(path: str, body: bytes, headers: Mapping[str, str], max_body_bytes: int) -> InferenceCall:
    """The request behind an HTTP body, or `HttpRefusal` saying what is wrong with it (400, 404, 413)."""
    kind = API_PATHS.get(path.split("?", 1)[0])
    if kind is None:
        raise HttpRefusal(HTTPStatus.NOT_FOUND, "unknown_path",
                          f"{path} is not an inference API here; use one of {', '.join(sorted(API_PATHS))}")
    if len(body) > max_body_bytes:
        raise HttpRefusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too_large",
                          f"the body has {len(body)} bytes, over the limit of {max_body_bytes}")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _bad(f"the body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise _bad("the body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model is required: name a family (e.g. gemma3:270m) or an exact tag")
    model, preference = _preference(model.strip(), headers)
    common: dict[str, Any] = {"model": model, "preference": preference, "constraints": _constraints(headers),
              "options": _options(data)}
    request: pb.GenerateRequest | pb.ChatRequest
    if kind == "chat":
        request = pb.ChatRequest(messages=_messages(data), **common)
    else:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad("prompt must be a string")
        system = data.get("system")
        request = pb.GenerateRequest(prompt=prompt, system=system if isinstance(system, str) else "", **common)
    return InferenceCall(path, kind, model, data, request)


def rewritten_body(call: InferenceCall, tag: str) -> list[bytes]:
    """The body with `model` set to `tag`, in chunks Envoy accepts as streamed mutations."""
    data = json.dumps({**call.body, "model": tag}, ensure_ascii=False).encode()
    return [data[i:i + BODY_CHUNK_BYTES] for i in range(0, len(data), BODY_CHUNK_BYTES)] or [b""]
