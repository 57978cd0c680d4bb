"""The Endpoint Picker Protocol over Envoy's ext_proc stream (envoy.service.ext_proc.v3), one stream per
HTTP request, bodies in FULL_DUPLEX_STREAMED mode (reference: fleet.md, GIE proposal 004).

Request: the headers are held until the body is complete; then the picker answers the headers with
`x-gateway-destination-endpoint` (primary, then fallbacks) and the identical `envoy.lb` dynamic
metadata, `content-length` for the rewritten body, and sends the body back with `model` set to the
chosen tag, in streamed chunks of at most 62,000 bytes. A request it will not route gets an
ImmediateResponse with a JSON error body (400/404/413 bad input, 503 nothing eligible, 429 shed).
Requests without a body, or to other paths, pass through unchanged to the least-busy live node.
Response: the decision goes into `x-quantrouter-*` headers; the served endpoint (Envoy's
`x-gateway-destination-endpoint-served`) is attributed in metrics, with the decode speed from an Ollama
final chunk; body chunks pass through as they come.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from quantrouter.errors import QuantrouterError
from quantrouter.gateway.envoy import DESTINATION
from quantrouter.gateway.inference import API_PATHS, BODY_CHUNK_BYTES, HttpRefusal, read_call, rewritten_body
from quantrouter.gateway.metrics import GatewayMetrics
from quantrouter.gateway.picker import Pick, Picker, http_refusal

__all__ = ["DESTINATION", "SERVED", "SUBSET", "SUBSET_NAMESPACE", "EndpointPicker"]

log = logging.getLogger(__name__)

SERVED = "x-gateway-destination-endpoint-served"
SUBSET = "x-gateway-destination-endpoint-subset"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
LB_NAMESPACE = "envoy.lb"
EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"
UPSTREAM_ADDRESS = "upstream.address"
VARIANT_HEADER = "x-quantrouter-variant"
NODE_HEADER = "x-quantrouter-node"
REASON_HEADER = "x-quantrouter-reason"
# Header values stay short and printable ASCII whatever the reason's wording.
MAX_REASON_CHARS = 300
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_ASCII = str.maketrans({"≈": "~", "≥": ">=", "≤": "<=", "×": "x", "→": "->", "−": "-", "…": "..."})
# The tail of a response kept to read an Ollama final chunk's eval_count / eval_duration.
RESPONSE_TAIL_BYTES = 4096


def _headers(message: ext.HttpHeaders) -> dict[str, str]:
    return {h.key.lower(): (h.raw_value.decode("latin-1") if h.raw_value else h.value) for h in message.headers.headers}


def _set(headers: Mapping[str, str]) -> ext.HeaderMutation:
    return ext.HeaderMutation(set_headers=[
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                                   append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
        for k, v in headers.items()])


def _streamed(chunk: bytes, end: bool) -> ext.CommonResponse:
    return ext.CommonResponse(body_mutation=ext.BodyMutation(
        streamed_response=ext.StreamedBodyResponse(body=chunk, end_of_stream=end)))


def _refusal(refusal: HttpRefusal) -> ext.ProcessingResponse:
    body = json.dumps({"error": {"message": refusal.message, "type": refusal.reason, "code": int(refusal.status)}})
    headers = {"content-type": "application/json"}
    if refusal.retry_after is not None:
        headers["retry-after"] = str(max(1, round(refusal.retry_after)))
    return ext.ProcessingResponse(immediate_response=ext.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=int(refusal.status)), headers=_set(headers), body=body.encode(),
        details=f"quantrouter_{refusal.reason}"))


def _subset(metadata: base_pb2.Metadata) -> frozenset[str] | None:
    """The gateway's subset hint: a list of ip:port, or (as the reference picker accepts) a comma string."""
    hint = metadata.filter_metadata.get(SUBSET_NAMESPACE)
    if hint is None or SUBSET not in hint.fields:
        return None
    value = hint.fields[SUBSET]
    if value.HasField("list_value"):
        items = [v.string_value for v in value.list_value.values]
    else:
        items = value.string_value.split(",")
    return frozenset(item.strip() for item in items if item.strip())


def _served(message: ext.ProcessingRequest) -> str:
    """The endpoint that served the response: as the gateway says (`envoy.lb` metadata), else Envoy's
    `upstream.address` attribute."""
    lb = message.metadata_context.filter_metadata.get(LB_NAMESPACE)
    if lb is not None and SERVED in lb.fields:
        return str(lb.fields[SERVED].string_value)
    attributes = message.attributes.get(EXT_PROC_ATTRIBUTES)
    if attributes is not None and UPSTREAM_ADDRESS in attributes.fields:
        return str(attributes.fields[UPSTREAM_ADDRESS].string_value)
    return ""


def _decode_speed(tail: bytes) -> float | None:
    """Tokens/sec from an Ollama final chunk (the last NDJSON line, or a whole JSON answer), if there is one."""
    line = tail.rstrip().rsplit(b"\n", 1)[-1]
    try:
        final = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(final, dict):
        return None
    count, duration = final.get("eval_count"), final.get("eval_duration")
    if isinstance(count, int) and isinstance(duration, int) and count > 0 and duration > 0:
        return count / (duration / 1e9)
    return None


@dataclass
class _Exchange:
    """One HTTP request's progress through the stream."""

    headers: dict[str, str] = field(default_factory=dict)
    subset: frozenset[str] | None = None
    body: bytearray = field(default_factory=bytearray)
    pick: Pick | None = None
    node: str = ""
    answered_at: float = 0.0
    first_byte: bool = False
    tail: bytes = b""
    finished: bool = False


class EndpointPicker(ext_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, picker: Picker, metrics: GatewayMetrics, max_body_bytes: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._picker = picker
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes
        self._clock = clock

    async def Process(self, requests: AsyncIterator[ext.ProcessingRequest], context: Any
                      ) -> AsyncIterator[ext.ProcessingResponse]:
        exchange = _Exchange()
        try:
            async for message in requests:
                for response in self._answer(exchange, message):
                    yield response
                    if response.HasField("immediate_response"):
                        return
        finally:
            self._finish(exchange)

    def _answer(self, exchange: _Exchange, message: ext.ProcessingRequest) -> Iterator[ext.ProcessingResponse]:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            exchange.headers = _headers(message.request_headers)
            exchange.subset = _subset(message.metadata_context)
            if message.request_headers.end_of_stream:
                yield from self._route(exchange, bodyless=True)
        elif kind == "request_body":
            exchange.body += message.request_body.body
            if len(exchange.body) > self._max_body_bytes:
                yield self._refuse(HttpRefusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too_large",
                                               f"the body is over the limit of {self._max_body_bytes} bytes"))
            elif message.request_body.end_of_stream:
                yield from self._route(exchange, bodyless=False)
        elif kind == "response_headers":
            yield self._on_response(exchange, message)
            if message.response_headers.end_of_stream:
                self._finish(exchange)
        elif kind == "response_body":
            yield self._relay(exchange, message.response_body)
        elif kind == "request_trailers":
            yield ext.ProcessingResponse(request_trailers=ext.TrailersResponse())
        elif kind == "response_trailers":
            yield ext.ProcessingResponse(response_trailers=ext.TrailersResponse())

    def _refuse(self, refusal: HttpRefusal) -> ext.ProcessingResponse:
        self._metrics.refusals.labels(str(int(refusal.status)), refusal.reason).inc()
        log.info("refused %d %s: %s", refusal.status, refusal.reason, refusal.message)
        return _refusal(refusal)

    def _route(self, exchange: _Exchange, *, bodyless: bool) -> Iterator[ext.ProcessingResponse]:
        started = self._clock()
        path = exchange.headers.get(":path", "").split("?", 1)[0]
        body = bytes(exchange.body)
        try:
            if bodyless or path not in API_PATHS:
                node = self._passthrough_node(exchange.subset)
                endpoints: tuple[str, ...] = (self._picker.endpoint(node),)
                chunks = [body[i:i + BODY_CHUNK_BYTES] for i in range(0, len(body), BODY_CHUNK_BYTES)] or [b""]
                extra: dict[str, str] = {}
            else:
                call = read_call(path, body, exchange.headers, self._max_body_bytes)
                exchange.pick = pick = self._picker.pick(call, exchange.subset)
                node, endpoints, chunks = pick.node, pick.endpoints, rewritten_body(call, pick.tag)
                extra = {"content-length": str(sum(len(c) for c in chunks))}
                d = pick.decision
                self._metrics.picks.labels(node, d.family, pick.tag, d.preference.value, d.reason_code).inc()
        except HttpRefusal as refusal:
            yield self._refuse(refusal)
            return
        exchange.node = node
        destination = ",".join(endpoints)
        metadata = struct_pb2.Struct()
        metadata.update({LB_NAMESPACE: {DESTINATION: destination}})
        mutation = _set({DESTINATION: destination, **extra})
        exchange.answered_at = self._clock()
        self._metrics.pick_seconds.observe(exchange.answered_at - started)
        self._metrics.in_flight.inc()
        yield ext.ProcessingResponse(request_headers=ext.HeadersResponse(
            response=ext.CommonResponse(header_mutation=mutation, clear_route_cache=True)), dynamic_metadata=metadata)
        if not bodyless:
            for i, chunk in enumerate(chunks):
                yield ext.ProcessingResponse(request_body=ext.BodyResponse(response=_streamed(chunk,
                                                                                             i == len(chunks) - 1)))

    def _passthrough_node(self, subset: frozenset[str] | None) -> str:
        """The live node (within the subset) with the fewest streams: for requests that name no model."""
        try:
            live = self._picker.live_nodes(subset)
        except QuantrouterError as error:
            raise http_refusal(error) from None
        if not live:
            raise HttpRefusal(HTTPStatus.SERVICE_UNAVAILABLE, "subset", "no live node among the allowed endpoints")
        name = min(sorted(live), key=lambda n: live[n].in_flight)
        self._picker.outstanding[name] += 1
        return name

    def _on_response(self, exchange: _Exchange, message: ext.ProcessingRequest) -> ext.ProcessingResponse:
        served = _served(message)
        node = self._picker.node_at(served) if served else None
        if node is not None and node != exchange.node and exchange.node:
            self._picker.move(exchange.node, node)
            exchange.node = node
        headers: dict[str, str] = {}
        pick = exchange.pick
        if pick is not None:
            fallback = node is not None and node != pick.node
            self._metrics.served.labels(exchange.node, pick.tag, str(fallback).lower()).inc()
            reason = _UNPRINTABLE.sub("?", pick.decision.reason.translate(_ASCII))[:MAX_REASON_CHARS]
            headers = {VARIANT_HEADER: pick.tag, NODE_HEADER: exchange.node, REASON_HEADER: reason}
        return ext.ProcessingResponse(response_headers=ext.HeadersResponse(
            response=ext.CommonResponse(header_mutation=_set(headers))))

    def _relay(self, exchange: _Exchange, body: ext.HttpBody) -> ext.ProcessingResponse:
        pick = exchange.pick
        if pick is not None:
            if not exchange.first_byte and body.body:
                exchange.first_byte = True
                self._metrics.time_to_first_byte.labels(exchange.node, pick.tag).observe(
                    self._clock() - exchange.answered_at)
            exchange.tail = (exchange.tail + body.body)[-RESPONSE_TAIL_BYTES:]
            if body.end_of_stream:
                speed = _decode_speed(exchange.tail)
                if speed is not None:
                    self._metrics.tokens_per_second.labels(exchange.node, pick.tag).observe(speed)
        if body.end_of_stream:
            self._finish(exchange)
        return ext.ProcessingResponse(response_body=ext.BodyResponse(response=_streamed(body.body,
                                                                                       body.end_of_stream)))

    def _finish(self, exchange: _Exchange) -> None:
        """The stream sent to `exchange.node` is over (once, however it ended)."""
        if exchange.node and not exchange.finished:
            exchange.finished = True
            self._picker.release(exchange.node)
            self._metrics.in_flight.dec()
