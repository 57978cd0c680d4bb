"""The inventory's refresh loop must end when cancelled, even when a poke lands at the same moment.

Every finishing stream pokes the loop; at shutdown its cancellation can arrive in the same turn. With
`asyncio.wait_for` (Python 3.11) that cancellation was swallowed and shutdown waited for ever.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from quantrouter.backend import OllamaBackend
from quantrouter.config import BackendSettings, CatalogSettings
from quantrouter.inventory import Inventory

REFRESH_S = 30.0


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_cancelling_the_loop_as_it_is_poked_stops_it() -> None:
    backend = OllamaBackend(BackendSettings(f"http://127.0.0.1:{closed_port()}", connect_timeout=1.0,
                                            read_timeout=1.0))
    inventory = Inventory(backend, CatalogSettings(tags_refresh_interval=REFRESH_S, ps_refresh_interval=REFRESH_S))
    try:
        task = asyncio.create_task(inventory.run())
        await asyncio.sleep(0)  # the loop is now waiting for a poke or its interval
        inventory.poke()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(2.0):
                await task
    finally:
        await backend.close()
