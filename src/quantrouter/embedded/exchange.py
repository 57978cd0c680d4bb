"""One generate or chat request in flight: where its text goes, in which framing, and whether the client is
still there. Ollama's own API frames chunks as NDJSON lines; its OpenAI-compatible API as server-sent events.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web

__all__ = ["NDJSON", "Exchange", "ndjson_line"]

NDJSON = "application/x-ndjson"


def ndjson_line(chunk: dict[str, Any]) -> bytes:
    return json.dumps(chunk).encode() + b"\n"


@dataclass(eq=False)
class Exchange:
    request: web.Request
    stream: bool
    started_ns: int
    content_type: str = NDJSON
    frame: Callable[[dict[str, Any]], bytes] = ndjson_line
    response: web.StreamResponse | None = None
    texts: list[str] = field(default_factory=list)

    @property
    def client_gone(self) -> bool:
        return self.request.transport is None or self.request.transport.is_closing()

    async def send(self, chunk: dict[str, Any]) -> None:
        """One framed chunk; the response starts (status 200) with the first one."""
        await self.write(self.frame(chunk))

    async def write(self, data: bytes) -> None:
        if self.response is None:
            self.response = web.StreamResponse(headers={"Content-Type": self.content_type})
            await self.response.prepare(self.request)
        await self.response.write(data)

    def abandoned(self) -> web.StreamResponse:
        """The answer to a client that left: whatever was started, else 204 (nobody reads it)."""
        return self.response or web.Response(status=HTTPStatus.NO_CONTENT)

    async def end(self, *last: dict[str, Any], trailer: bytes = b"") -> web.StreamResponse:
        """Close a streamed answer: its last chunks, any trailing bytes (SSE's `[DONE]`), then the end of body.

        A client that leaves between the last token and the final chunk (a deadline expiring) is no error: the
        answer is abandoned, as one left mid-stream is, instead of aiohttp logging a traceback for it."""
        try:
            for chunk in last:
                await self.send(chunk)
            if trailer:
                await self.write(trailer)
            assert self.response is not None
            await self.response.write_eof()
        except ConnectionResetError:
            return self.abandoned()
        return self.response
