"""The Endpoint Picker Protocol as a gateway other than Envoy would speak it: ext_proc messages sent straight
to the running picker over gRPC (the subset hint, the destination in header and metadata, health), and its
metrics read back through Prometheus's own checker."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator

import grpc
import httpx
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quantrouter.gateway.server import HEALTH_SERVICES
from tests.deploy.conftest import find_tool
from tests.gateway.conftest import Gateway
from tests.support import FAMILY

BODY = json.dumps({"model": FAMILY, "prompt": "hi", "options": {"num_predict": 4}}).encode()


def _request(subset: list[str] | None) -> list[ext.ProcessingRequest]:
    metadata = base_pb2.Metadata()
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": subset})
        metadata.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":path", raw_value=b"/api/generate"),
                                          base_pb2.HeaderValue(key=":method", raw_value=b"POST")])
    return [ext.ProcessingRequest(request_headers=ext.HttpHeaders(headers=headers), metadata_context=metadata),
            ext.ProcessingRequest(request_body=ext.HttpBody(body=BODY, end_of_stream=True))]


async def _answers(gateway: Gateway, subset: list[str] | None) -> list[ext.ProcessingResponse]:
    """The picker's answers to one request's headers and body (the stream is then dropped, as on a reset)."""
    async def messages() -> AsyncIterator[ext.ProcessingRequest]:
        for message in _request(subset):
            yield message

    async with grpc.aio.insecure_channel(gateway.settings.server.grpc_address) as channel:
        call = ext_grpc.ExternalProcessorStub(channel).Process(messages())
        answers = []
        async for answer in call:
            answers.append(answer)
            if answer.HasField("immediate_response") or answer.HasField("request_body"):
                break
        call.cancel()
    return answers


def _destination(answer: ext.ProcessingResponse) -> tuple[str, str]:
    headers = {h.header.key: h.header.raw_value.decode()
               for h in answer.request_headers.response.header_mutation.set_headers}
    lb = answer.dynamic_metadata.fields["envoy.lb"].struct_value
    return headers["x-gateway-destination-endpoint"], lb.fields["x-gateway-destination-endpoint"].string_value


async def test_the_subset_hint_limits_the_choice_and_an_empty_one_is_503(gateway: Gateway) -> None:
    endpoints = gateway.settings.fleet.endpoints
    free_choice = await _answers(gateway, None)
    header, metadata = _destination(free_choice[0])
    assert header == metadata and header in endpoints.values()
    for node in ("small", "medium"):
        only = await _answers(gateway, [endpoints[node]])
        assert _destination(only[0]) == (endpoints[node], endpoints[node])
        body = json.loads(only[1].request_body.response.body_mutation.streamed_response.body)
        assert body["model"].startswith(f"{FAMILY}-")
    refused = await _answers(gateway, [])
    assert refused[0].immediate_response.status.code == 503
    assert "allows" in json.loads(refused[0].immediate_response.body)["error"]["message"]


async def test_health_answers_for_the_names_gateways_probe(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(gateway.settings.server.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in HEALTH_SERVICES:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name


def test_metrics_pass_promtool_and_count_refusals(gateway: Gateway) -> None:
    assert gateway.picker is not None
    assert httpx.post(f"{gateway.url}/api/chat", content=b"{", timeout=30).status_code == 400
    text = httpx.get(f"http://127.0.0.1:{gateway.picker.metrics_port}/metrics", timeout=10).text
    checked = subprocess.run([find_tool("promtool"), "check", "metrics"], input=text.encode(), capture_output=True,
                             timeout=30, check=False)
    assert checked.returncode == 0, checked.stderr.decode()
    assert 'quantrouter_gateway_refusals_total{reason="bad_request",status="400"}' in text
    for name in ("quantrouter_gateway_pick_seconds_bucket", "quantrouter_gateway_in_flight_requests",
                 "quantrouter_fleet_node_up"):
        assert name in text, name
