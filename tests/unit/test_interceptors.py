"""The interceptors build each method's wrapped handler once and reuse it while the handler they are given is the
same; a different handler (another method, or grpc handing over a new one) is wrapped anew. Real grpc handler
objects and interceptors; `continuation` is grpc's own contract (details → the next handler), played here by a
dict lookup as the server's generic handler does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from quantrouter.errors import QuantrouterError
from quantrouter.interceptors import AuthInterceptor, MetricsInterceptor, StatusInterceptor
from quantrouter.metrics import Metrics
from quantrouter.service import status_of


class _Details(grpc.HandlerCallDetails):  # type: ignore[misc]
    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.method = method
        self.invocation_metadata = metadata


async def _stream(request: Any, context: Any) -> AsyncIterator[Any]:
    yield request


async def _unary(request: Any, context: Any) -> Any:
    return request


HANDLERS = {"/s/Stream": grpc.unary_stream_rpc_method_handler(_stream),
            "/s/Unary": grpc.unary_unary_rpc_method_handler(_unary)}


async def _intercepted(interceptor: grpc.aio.ServerInterceptor, details: _Details,
                       handlers: dict[str, grpc.RpcMethodHandler] = HANDLERS) -> grpc.RpcMethodHandler:
    async def continuation(d: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return handlers[d.method]
    handler: grpc.RpcMethodHandler = await interceptor.intercept_service(continuation, details)
    return handler


def _to_status(error: QuantrouterError) -> Any:
    return status_of(error)


async def test_each_method_is_wrapped_once_and_reused() -> None:
    for interceptor in (StatusInterceptor(_to_status), MetricsInterceptor(Metrics(CollectorRegistry()))):
        stream = await _intercepted(interceptor, _Details("/s/Stream"))
        unary = await _intercepted(interceptor, _Details("/s/Unary"))
        assert stream is not HANDLERS["/s/Stream"] and stream.unary_stream is not _stream
        assert await _intercepted(interceptor, _Details("/s/Stream")) is stream
        assert await _intercepted(interceptor, _Details("/s/Unary")) is unary
        assert unary is not stream


async def test_a_new_handler_for_a_method_is_wrapped_anew() -> None:
    interceptor = StatusInterceptor(_to_status)
    first = await _intercepted(interceptor, _Details("/s/Stream"))
    replaced = {"/s/Stream": grpc.unary_stream_rpc_method_handler(_stream)}
    second = await _intercepted(interceptor, _Details("/s/Stream"), replaced)
    assert second is not first
    assert await _intercepted(interceptor, _Details("/s/Stream"), replaced) is second


async def test_auth_decides_on_every_call_with_the_wrapper_cached() -> None:
    interceptor = AuthInterceptor(frozenset({"secret"}), _to_status)
    allowed = (("authorization", "Bearer secret"),)
    assert await _intercepted(interceptor, _Details("/s/Stream", allowed)) is HANDLERS["/s/Stream"]
    denied = await _intercepted(interceptor, _Details("/s/Stream"))
    assert denied is not HANDLERS["/s/Stream"]
    assert await _intercepted(interceptor, _Details("/s/Stream", allowed)) is HANDLERS["/s/Stream"]
    assert await _intercepted(interceptor, _Details("/s/Stream")) is denied
