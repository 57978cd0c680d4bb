"""`--discover k8s://NAMESPACE/SERVICE` through lightkube against a stand-in Kubernetes API server.

The stand-in (the one stand-in of the fleet tests: no cluster can run here) serves an EndpointSlice list
and a watch stream from the files in recorded/, shaped as the discovery.k8s.io/v1 API returns them, and
can be told to fail. It checks the requests lightkube sends: the Service's label selector, and a watch
that starts from the list's resourceVersion.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from lightkube import AsyncClient, KubeConfig

from quantrouter.fleet.discovery import follow_service, parse_target

RECORDED = Path(__file__).parent / "recorded"
TOKEN = "stand-in-service-account-token"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/llm/endpointslices"


@dataclass
class StandInApiServer:
    url: str
    queries: list[dict[str, str]] = field(default_factory=list)
    failing: bool = False
    watch_released: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def api_server() -> AsyncIterator[StandInApiServer]:
    state = StandInApiServer("")

    async def endpointslices(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)
        state.queries.append(dict(request.query))
        if state.failing:
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "message": "etcdserver: request timed out", "reason": "Timeout",
                                      "code": 504}, status=504)
        if request.query.get("watch") not in ("true", "1"):
            return web.Response(text=(RECORDED / "endpointslices-list.json").read_text(),
                                content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for line in (RECORDED / "endpointslices-watch.ndjson").read_text().splitlines():
            await response.write(line.encode() + b"\n")
        await state.watch_released.wait()  # then the stream ends, as an API server's watch does
        return response

    app = web.Application()
    app.router.add_get(SLICES, endpointslices)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        state.watch_released.set()
        await runner.cleanup()


async def _until(condition: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_ready_endpoints_become_nodes_and_a_discovery_error_keeps_the_last_good_set(
        api_server: StandInApiServer, caplog: pytest.LogCaptureFixture) -> None:
    updates: list[Mapping[str, str]] = []
    errors: list[str] = []
    client = AsyncClient(config=KubeConfig.from_dict({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": api_server.url}}],
        "users": [{"name": "fleet", "user": {"token": TOKEN}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "fleet"}}]}))
    caplog.set_level(logging.INFO, logger="quantrouter.fleet.discovery")
    task = asyncio.create_task(follow_service("k8s://llm/ollama-nodes", updates.append, errors.append, client))
    try:
        await _until(lambda: len(updates) >= 2)
        # The list: ollama-2 is not ready yet. The watch: ollama-1 is terminating, ollama-2 became ready.
        assert updates[0] == {"ollama-0": "10.42.0.17:50051", "ollama-1": "10.42.1.9:50051"}
        assert updates[1] == {"ollama-0": "10.42.0.17:50051", "ollama-2": "10.42.2.4:50051"}
        listing, watch = api_server.queries[0], api_server.queries[1]
        assert listing["labelSelector"] == "kubernetes.io/service-name=ollama-nodes"
        assert watch["watch"] in ("true", "1") and watch["resourceVersion"] == "48213"

        api_server.failing = True
        api_server.watch_released.set()  # the watch ends; the re-list fails
        await _until(lambda: bool(errors), timeout=15)
        assert updates[-1] == {"ollama-0": "10.42.0.17:50051", "ollama-2": "10.42.2.4:50051"}
        assert len(updates) == 2  # nothing was withdrawn
        assert any("keeping the last good node set (2: ollama-0, ollama-2)" in r.getMessage() for r in caplog.records)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


def test_targets_are_parsed_or_refused_with_the_expected_form() -> None:
    assert parse_target("k8s://llm/ollama-nodes:50051").port == 50051
    assert parse_target("k8s://llm/ollama-nodes").port is None
    with pytest.raises(ValueError, match="k8s://NAMESPACE/SERVICE"):
        parse_target("k8s://ollama-nodes")
    with pytest.raises(ValueError):
        parse_target("http://llm/x")
