"""`serve` runs what a starter built until SIGTERM, then stops it; what starting built is frozen out of the
cyclic collector's reach first, so that full collections under load do not rescan it.

The starter is a stand-in for the router (a `Stoppable` that notes what it saw when stopped): what is tested is
`serve`'s own sequence, not a server.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal

from quantrouter.config import Settings
from quantrouter.server import serve


class _Started:
    def __init__(self) -> None:
        self.cut_short = asyncio.Event()
        self.frozen_when_started = gc.get_freeze_count()
        self.frozen_when_stopped: int | None = None

    async def stop(self, grace: float | None = None) -> None:
        self.frozen_when_stopped = gc.get_freeze_count()


async def test_serve_freezes_what_starting_built_and_stops_on_sigterm() -> None:
    built: list[_Started] = []

    async def starter(settings: Settings) -> _Started:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        built.append(_Started())
        return built[0]

    gc.unfreeze()
    try:
        assert await serve(Settings(), starter) == 0
    finally:
        gc.unfreeze()  # the test process's objects go back to the collector
    started = built[0]
    assert started.frozen_when_started == 0  # nothing frozen before the starter ran
    assert started.frozen_when_stopped  # serve froze what existed once the starter returned
