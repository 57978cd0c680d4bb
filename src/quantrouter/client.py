"""A small client for Python callers: `AsyncRouterClient` and its twin `RouterClient`.

Everything a caller needs is importable from here, the routing decision's types included.

Both build the same requests (`_Requests`) and convert the same answers to plain values: a stream
yields a `Decision`, then text (`str`), then a `Completion`.

    async with AsyncRouterClient("127.0.0.1:50051") as client:
        async for event in client.generate("gemma3:270m", "Why is the sky blue?", preference="quality"):
            ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from quantrouter.values import Assessment, Completion, Decision, Preference, Variant

__all__ = [
    "DEFAULT_TARGET",
    "Assessment",
    "AsyncRouterClient",
    "ChannelOption",
    "Completion",
    "Constraints",
    "Decision",
    "ErrorDetails",
    "Event",
    "Options",
    "Preference",
    "PreferenceName",
    "RouterClient",
    "Variant",
    "VariantListing",
    "async_channel",
    "bearer_metadata",
    "blocking_channel",
    "error_details",
]

PreferenceName = Literal["quality", "balanced", "latency"]
Event = Decision | str | Completion
# A gRPC channel argument: (name, value), e.g. ("grpc.max_receive_message_length", 4 << 20).
ChannelOption = tuple[str, int | str]
DEFAULT_TARGET = "127.0.0.1:50051"

_PREFERENCE_PB = {"quality": pb.PREFERENCE_QUALITY, "balanced": pb.PREFERENCE_BALANCED,
                  "latency": pb.PREFERENCE_LATENCY}
_PREFERENCE_OF_PB = {pb.PREFERENCE_QUALITY: Preference.QUALITY, pb.PREFERENCE_BALANCED: Preference.BALANCED,
                     pb.PREFERENCE_LATENCY: Preference.LATENCY, pb.PREFERENCE_UNSPECIFIED: Preference.BALANCED}


@dataclass(frozen=True, slots=True)
class Options:
    """Ollama generation options; None leaves the backend's default."""

    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None
    format: str = ""


@dataclass(frozen=True, slots=True)
class Constraints:
    """Filters applied before the preference ranks the variants."""

    min_quantization: str = ""
    allowed_quantizations: tuple[str, ...] = ()
    min_tokens_per_second: float = 0.0
    max_time_to_first_token: float | None = None


@dataclass(frozen=True, slots=True)
class VariantListing:
    families: dict[str, tuple[Variant, ...]]
    memory_source: str
    free_bytes: int
    total_bytes: int
    memory_detail: str = ""
    gpus: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """What the router says about a failed call beyond its status: why, when to retry, which fields."""

    reason: str = ""
    retry_after: float | None = None
    field_violations: tuple[str, ...] = ()


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """ErrorInfo reason, RetryInfo delay and BadRequest fields from a failed call's rich status."""
    status = rpc_status.from_call(error)
    reason, retry_after, fields = "", None, ()
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = tuple(v.field for v in bad.field_violations)
    return ErrorDetails(reason, retry_after, fields)


def _seconds(duration: Any) -> float:
    return float(duration.ToNanoseconds()) / 1e9


def _decision_of(message: pb.RouteDecision) -> Decision:
    candidates = tuple(Assessment(
        c.variant, c.quantization, c.memory_bytes, c.resident, c.tokens_per_second, c.tokens_per_second_measured,
        _seconds(c.time_to_first_token), _seconds(c.expected_duration), c.quality, c.score, c.rejection, node=c.node,
        queue_seconds=_seconds(c.queue_duration), churn_seconds=_seconds(c.churn_duration), at_risk=c.at_risk,
        quality_measured=c.quality_measured, endangers=c.endangers, held_back=c.held_back)
        for c in message.candidates)
    chosen = next((c for c in candidates if c.tag == message.variant and c.node == message.node), None)
    return Decision(message.model, _PREFERENCE_OF_PB[message.preference], chosen, message.reason, candidates,
                    message.downgraded, message.pinned, message.fallback, None, message.memory_source,
                    message.free_memory_bytes, message.node)


def _completion_of(message: pb.Completion) -> Completion:
    return Completion(message.variant, message.prompt_tokens, message.generated_tokens, message.tokens_per_second,
                      message.prompt_tokens_per_second, _seconds(message.time_to_first_token),
                      _seconds(message.load_duration), _seconds(message.total_duration), message.done_reason)


def _event_of(message: Any) -> Event:
    kind = message.WhichOneof("event")
    if kind == "decision":
        return _decision_of(message.decision)
    if kind == "completion":
        return _completion_of(message.completion)
    return str(message.chunk.text)


def _listing_of(message: pb.ListVariantsResponse) -> VariantListing:
    families = {f.name: tuple(Variant(v.tag, v.quantization, v.size_bytes, v.parameter_count, v.resident,
                                      v.vram_bytes, v.tokens_per_second, v.tokens_per_second_measured, v.samples,
                                      v.quality, v.quality_measured) for v in f.variants)
                for f in message.families}
    memory = message.memory
    return VariantListing(families, memory.source, memory.free_bytes, memory.total_bytes, memory.detail,
                          tuple(g.name for g in memory.gpus))


class _Requests:
    """Request building shared by both clients."""

    @staticmethod
    def constraints(given: Constraints | None) -> pb.Constraints:
        c = given or Constraints()
        message = pb.Constraints(min_quantization=c.min_quantization,
                                 allowed_quantizations=list(c.allowed_quantizations),
                                 min_tokens_per_second=c.min_tokens_per_second)
        if c.max_time_to_first_token is not None:
            message.max_time_to_first_token.FromNanoseconds(int(c.max_time_to_first_token * 1e9))
        return message

    @staticmethod
    def options(options: Options | None) -> pb.GenerationOptions:
        o = options or Options()
        message = pb.GenerationOptions(stop=list(o.stop), format=o.format)
        for name in ("num_predict", "temperature", "top_p", "top_k", "seed", "num_ctx"):
            value = getattr(o, name)
            if value is not None:
                setattr(message, name, value)
        return message

    def generate(self, model: str, prompt: str, system: str, preference: PreferenceName, options: Options | None,
                 constraints: Constraints | None) -> pb.GenerateRequest:
        return pb.GenerateRequest(model=model, prompt=prompt, system=system, preference=_PREFERENCE_PB[preference],
                                  constraints=self.constraints(constraints), options=self.options(options))

    def chat(self, model: str, messages: Sequence[tuple[str, str]], preference: PreferenceName,
             options: Options | None, constraints: Constraints | None) -> pb.ChatRequest:
        return pb.ChatRequest(model=model, messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
                              preference=_PREFERENCE_PB[preference], constraints=self.constraints(constraints),
                              options=self.options(options))

    def route(self, model: str, prompt: str, preference: PreferenceName, options: Options | None,
              constraints: Constraints | None) -> pb.RouteRequest:
        return pb.RouteRequest(model=model, prompt=prompt, preference=_PREFERENCE_PB[preference],
                               constraints=self.constraints(constraints), options=self.options(options))


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata a router that requires a token accepts; none without a token."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def async_channel(target: str, credentials: grpc.ChannelCredentials | None = None,
                  options: Sequence[ChannelOption] = ()) -> grpc.aio.Channel:
    """A channel to a router: TLS when `credentials` are given, else plaintext."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, credentials, options=list(options))


def blocking_channel(target: str, credentials: grpc.ChannelCredentials | None = None,
                     options: Sequence[ChannelOption] = ()) -> grpc.Channel:
    """The blocking twin of `async_channel`."""
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=list(options))


class AsyncRouterClient:
    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self._channel = async_channel(target, credentials)
        self._stub = pb_grpc.RouterServiceStub(self._channel)
        self._metadata = bearer_metadata(token)
        self._requests = _Requests()

    async def __aenter__(self) -> AsyncRouterClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, model: str, prompt: str, *, system: str = "", preference: PreferenceName = "balanced",
                       options: Options | None = None, constraints: Constraints | None = None,
                 timeout: float | None = None) -> AsyncIterator[Event]:
        request = self._requests.generate(model, prompt, system, preference, options, constraints)
        async for message in self._stub.Generate(request, timeout=timeout, metadata=self._metadata):
            yield _event_of(message)

    async def chat(self, model: str, messages: Sequence[tuple[str, str]], *, preference: PreferenceName = "balanced",
                   options: Options | None = None, constraints: Constraints | None = None,
                 timeout: float | None = None) -> AsyncIterator[Event]:
        request = self._requests.chat(model, messages, preference, options, constraints)
        async for message in self._stub.Chat(request, timeout=timeout, metadata=self._metadata):
            yield _event_of(message)

    async def route(self, model: str, *, prompt: str = "", preference: PreferenceName = "balanced",
                    options: Options | None = None, constraints: Constraints | None = None,
                 timeout: float | None = None) -> Decision:
        request = self._requests.route(model, prompt, preference, options, constraints)
        response = await self._stub.Route(request, timeout=timeout, metadata=self._metadata)
        return _decision_of(response.decision)

    async def list_variants(self, model: str = "", *, timeout: float | None = None) -> VariantListing:
        response = await self._stub.ListVariants(pb.ListVariantsRequest(model=model), timeout=timeout,
                                                 metadata=self._metadata)
        return _listing_of(response)


class RouterClient:
    """The blocking twin of `AsyncRouterClient`, for scripts and synchronous services."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self._channel = blocking_channel(target, credentials)
        self._stub = pb_grpc.RouterServiceStub(self._channel)
        self._metadata = bearer_metadata(token)
        self._requests = _Requests()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, model: str, prompt: str, *, system: str = "", preference: PreferenceName = "balanced",
                 options: Options | None = None, constraints: Constraints | None = None,
                 timeout: float | None = None) -> Iterator[Event]:
        request = self._requests.generate(model, prompt, system, preference, options, constraints)
        for message in self._stub.Generate(request, timeout=timeout, metadata=self._metadata):
            yield _event_of(message)

    def chat(self, model: str, messages: Sequence[tuple[str, str]], *, preference: PreferenceName = "balanced",
             options: Options | None = None, constraints: Constraints | None = None,
                 timeout: float | None = None) -> Iterator[Event]:
        request = self._requests.chat(model, messages, preference, options, constraints)
        for message in self._stub.Chat(request, timeout=timeout, metadata=self._metadata):
            yield _event_of(message)

    def route(self, model: str, *, prompt: str = "", preference: PreferenceName = "balanced",
              options: Options | None = None, constraints: Constraints | None = None,
                 timeout: float | None = None) -> Decision:
        request = self._requests.route(model, prompt, preference, options, constraints)
        return _decision_of(self._stub.Route(request, timeout=timeout, metadata=self._metadata).decision)

    def list_variants(self, model: str = "", *, timeout: float | None = None) -> VariantListing:
        return _listing_of(self._stub.ListVariants(pb.ListVariantsRequest(model=model), timeout=timeout,
                                                  metadata=self._metadata))
