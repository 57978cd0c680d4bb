"""bench.overhead's floor arm, the bare gRPC relay in front of Ollama (bench.fixtures.bare_relay `--ollama`),
against the canned Ollama fixture over HTTP, called over a real socket with the router's own client.

Proves the floor is a fair arm: it streams the backend's whole text and its token count, which the router's own
relay test (test_relay_over_canned_ollama) checks the router for, so what the router adds beyond it is the router's
own work and not a lighter request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from bench.fixtures.bare_relay import BareOllamaRelay
from bench.fixtures.canned_ollama import CANNED_TEXT, FAMILY, VARIANTS, serve

from quantrouter.client import AsyncRouterClient, Options
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from quantrouter.values import Completion, Decision

TAG = VARIANTS[-1].tag
TOKENS = 40


@pytest.fixture
async def relay_address() -> AsyncIterator[str]:
    runner, url = await serve()
    relay = BareOllamaRelay(url, TAG)
    server = grpc.aio.server()
    pb_grpc.add_RouterServiceServicer_to_server(relay, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        await relay.close()
        await runner.cleanup()


async def test_the_bare_relay_streams_the_backends_text_and_counts_and_no_decision(relay_address: str) -> None:
    async with AsyncRouterClient(relay_address) as client:
        # A second stream on the same relay and backend connection, with a repeated option and a format, which
        # Ollama takes beside the options.
        for options in (Options(num_predict=TOKENS), Options(num_predict=TOKENS, stop=("\n\n",), format="json")):
            events = [event async for event in client.generate(FAMILY, "Why is the sky blue?", options=options)]
            *texts, completion = events
            assert "".join(t for t in texts if isinstance(t, str)) == \
                "".join(CANNED_TEXT[i % len(CANNED_TEXT)] for i in range(TOKENS))
            assert not any(isinstance(event, Decision) for event in events)  # one message fewer than a router's
            assert isinstance(completion, Completion)
            assert (completion.variant, completion.generated_tokens) == (TAG, TOKENS)
