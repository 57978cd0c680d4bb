"""Server interceptors: our errors → rich gRPC statuses, gRPC server metrics, bearer-token auth.

`StatusInterceptor` also makes request parsing tolerant: bytes protobuf refuses (a `string` field
that is not UTF-8, a truncated message) reach the handler as `Undecodable` and leave as
INVALID_ARGUMENT with a reason, where gRPC alone would answer UNKNOWN with no explanation.

Each wraps the unary-unary and unary-stream behaviours of the handler it intercepts (the only
kinds this service has) through one helper, `_wrapped`, so an interceptor states only what it does
around a call.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import hmac
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from quantrouter.errors import MalformedRequest, QuantrouterError, Unauthenticated
from quantrouter.metrics import Metrics

__all__ = ["AuthInterceptor", "MetricsInterceptor", "StatusInterceptor", "Undecodable"]

# Calls that stay open without a token: Kubernetes probes and reflection-based tools.
AUTH_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


@functools.cache
def _split(method: str) -> tuple[str, str]:
    """Service and method names; methods are the service's few (an unknown one never reaches an interceptor)."""
    service, _, name = method.lstrip("/").partition("/")
    return service, name


async def _awaited(result: Awaitable[Any]) -> AsyncIterator[Any]:
    await result
    return
    yield  # pragma: no cover - makes this an async generator with no messages


def _responses(behaviour: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """A server-streaming handler's messages: an async generator's own (no generator around it, so a message
    passes one frame less per interceptor), or none from one that writes with `context.write` and returns
    (grpc_health's `Watch` is such a coroutine)."""
    result = behaviour(request, context)
    return _awaited(result) if inspect.isawaitable(result) else cast(AsyncIterator[Any], result)


def _wrapped(handler: grpc.RpcMethodHandler, method: str, unary: Callable[..., Awaitable[Any]],
             stream: Callable[..., AsyncIterator[Any]]) -> grpc.RpcMethodHandler:
    """The handler with `unary` or `stream` around its behaviour. A stream is given to grpc as a partial of the
    interceptor's own async generator: grpc treats it as one (it looks through partials), and every message
    of every stream passes one generator frame less than through a wrapper generator."""
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=functools.partial(unary, handler.unary_unary, method=method))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=functools.partial(stream, handler.unary_stream, method=method))
    return handler


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request body the generated parser refused, with protobuf's own explanation."""

    error: str

    def reject(self) -> MalformedRequest:
        return MalformedRequest(f"the request is not a valid protobuf message ({self.error}); "
                                "every string field must be valid UTF-8")


def _set_status(context: grpc.aio.ServicerContext, rich: Any) -> None:
    """End the call with `rich` (a google.rpc.Status) once the handler returns, as an abort would but with no
    exception: grpc keeps an abort's AbortError on the call's state, and the error's traceback
    holds the frames whose locals hold the context, which holds that state, a reference cycle of about 50 objects
    per call for the garbage collector (tests/integration/test_no_garbage_per_refusal.py)."""
    status = rpc_status.to_status(rich)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as error:
            return Undecodable(str(error))
    return parse


class _Around(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Runs `_unary` or `_stream` around every RPC's behaviour; subclasses say what happens around it.

    The wrapped handler is built once per method and reused while grpc (or the interceptor inside this one)
    hands over the same handler: wrapping it anew cost every call a `_replace` and a partial per interceptor
    before its request reached the servicer."""

    def __init__(self) -> None:
        # Per method: the handler given, and the one wrapped around it.
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Callable[..., Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        return self._intercept(handler, details)

    def _intercept(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._wrap(handler, details.method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        cached = self._handlers.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._handlers[method] = (handler, self._around(handler, method))
        return cached[1]

    def _around(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return _wrapped(handler, method, self._unary, self._stream)

    @abc.abstractmethod
    async def _unary(self, behaviour: Callable[..., Awaitable[Any]], request: Any,
                     context: grpc.aio.ServicerContext, method: str) -> Any: ...

    @abc.abstractmethod
    def _stream(self, behaviour: Callable[..., AsyncIterator[Any]], request: Any,
                context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[Any]: ...


class StatusInterceptor(_Around):
    """Turns a `QuantrouterError` into the call's rich status (ErrorInfo and friends), set on the context: the
    handler then ends without an exception, and grpc sends that status with no message. Not an abort: each left
    a reference cycle (`_set_status`), and a burst's refusals left hundreds, scattered through the memory the
    burst took, for the garbage collector, whose full collections are rare."""

    def __init__(self, to_status: Callable[[QuantrouterError], Any]) -> None:
        super().__init__()
        self._to_status = to_status

    def _around(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        return super()._around(handler, method)

    async def _unary(self, behaviour: Callable[..., Awaitable[Any]], request: Any,
                     context: grpc.aio.ServicerContext, method: str) -> Any:
        try:
            if isinstance(request, Undecodable):
                raise request.reject()
            return await behaviour(request, context)
        except QuantrouterError as error:
            _set_status(context, self._to_status(error))
            return None  # grpc sends no message when the status is not OK

    async def _stream(self, behaviour: Callable[..., AsyncIterator[Any]], request: Any,
                      context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[Any]:
        try:
            if isinstance(request, Undecodable):
                raise request.reject()
            async for response in _responses(behaviour, request, context):
                yield response
        except QuantrouterError as error:
            _set_status(context, self._to_status(error))


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN if error is not None and not isinstance(error, grpc.aio.AbortError) \
        else grpc.StatusCode.OK


class MetricsInterceptor(_Around):
    """go-grpc-prometheus's series: started, handled by code, handling seconds, messages sent."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def _finish(self, kind: str, method: str, started: float, context: grpc.aio.ServicerContext,
                error: BaseException | None) -> None:
        service, name = _split(method)
        metrics = self._metrics
        metrics.grpc_handled_of(kind, service, name, _code_of(context, error).name).inc()
        metrics.grpc_handling_seconds_of(kind, service, name).observe(time.perf_counter() - started)

    async def _unary(self, behaviour: Callable[..., Awaitable[Any]], request: Any,
                     context: grpc.aio.ServicerContext, method: str) -> Any:
        service, name = _split(method)
        self._metrics.grpc_started_of("unary", service, name).inc()
        started, error = time.perf_counter(), None
        try:
            response = await behaviour(request, context)
            self._metrics.grpc_msg_sent_of("unary", service, name).inc()
            return response
        except BaseException as raised:
            error = raised
            raise
        finally:
            self._finish("unary", method, started, context, error)

    async def _stream(self, behaviour: Callable[..., AsyncIterator[Any]], request: Any,
                      context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[Any]:
        service, name = _split(method)
        self._metrics.grpc_started_of("server_stream", service, name).inc()
        sent = self._metrics.grpc_msg_sent_of("server_stream", service, name)
        started, error = time.perf_counter(), None
        try:
            async for response in _responses(behaviour, request, context):
                sent.inc()
                yield response
        except BaseException as raised:
            error = raised
            raise
        finally:
            self._finish("server_stream", method, started, context, error)


class AuthInterceptor(_Around):
    """Requires `authorization: Bearer <token>` on every call but health; compares in constant time."""

    def __init__(self, tokens: frozenset[str], to_status: Callable[[QuantrouterError], Any]) -> None:
        super().__init__()
        self._tokens = tuple(t.encode() for t in tokens)
        self._to_status = to_status

    def _allowed(self, metadata: Any) -> bool:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str) or not values[0].startswith("Bearer "):
            return False
        presented = values[0].removeprefix("Bearer ").encode()
        # Compare against every token, so the time taken says nothing about which one is close.
        matches = [hmac.compare_digest(presented, token) for token in self._tokens]
        return any(matches)

    def _intercept(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method.startswith(AUTH_EXEMPT_PREFIXES) or self._allowed(details.invocation_metadata):
            return handler
        return super()._intercept(handler, details)

    async def _unary(self, behaviour: Callable[..., Awaitable[Any]], request: Any,
                          context: grpc.aio.ServicerContext, method: str) -> Any:
        self._deny(context)
        return None  # grpc sends no message when the status is not OK

    async def _stream(self, behaviour: Callable[..., AsyncIterator[Any]], request: Any,
                           context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[Any]:
        self._deny(context)
        return
        yield  # pragma: no cover - makes this an async generator with no messages

    def _deny(self, context: grpc.aio.ServicerContext) -> None:
        error = Unauthenticated("missing or invalid bearer token: send metadata 'authorization: Bearer <token>'")
        _set_status(context, self._to_status(error))
