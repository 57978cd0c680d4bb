"""An answer's last chunk meeting a client that already left, over a real socket."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web

from quantrouter.embedded.exchange import Exchange

GONE_TIMEOUT_S = 5.0


async def _until_gone(exchange: Exchange) -> None:
    while not exchange.client_gone:
        await asyncio.sleep(0.01)


async def test_a_client_gone_before_the_final_chunk_is_an_abandoned_answer_not_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """A deadline that expires between the last token and the final chunk: the final write meets a closing
    transport. Unhandled, aiohttp logged "Error handling request" with a traceback for every such request."""
    ended: asyncio.Future[web.StreamResponse] = asyncio.get_running_loop().create_future()

    async def answer(request: web.Request) -> web.StreamResponse:
        exchange = Exchange(request, stream=True, started_ns=0)
        await exchange.send({"response": "Hi", "done": False})
        await asyncio.wait_for(_until_gone(exchange), GONE_TIMEOUT_S)
        try:
            response = await exchange.end({"response": "", "done": True})
        except BaseException as error:
            ended.set_exception(error)
            raise
        ended.set_result(response)
        return response

    app = web.Application()
    app.router.add_post("/api/generate", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/generate"
    try:
        with caplog.at_level(logging.ERROR):
            async with aiohttp.ClientSession() as session:
                response = await session.post(url, json={})
                assert await response.content.readline() == b'{"response": "Hi", "done": false}\n'
                response.close()  # the caller leaves before the final chunk
            answered = await asyncio.wait_for(ended, GONE_TIMEOUT_S)
        assert answered.prepared, "the started answer is what the handler returns"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        await runner.cleanup()
