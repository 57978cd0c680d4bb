"""Run an asyncio service on its own event loop in a daemon thread.

Tests and benchmarks share one backend or router across many test functions (each with its own
loop), and the demo/benchmarks drive them from synchronous code; a private loop per service keeps
them independent and talking only over real sockets.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["service_in_thread"]

T = TypeVar("T")

STOP_TIMEOUT_S = 30.0


@contextmanager
def service_in_thread(start: Callable[[], Coroutine[Any, Any, T]], stop: Callable[[T], Coroutine[Any, Any, None]], *,
                      name: str, start_timeout: float) -> Iterator[T]:
    """`start()` on a fresh loop in a thread; yields its result; `stop(result)` on exit."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            outcome.append(loop.run_until_complete(start()))
        except BaseException as error:
            failure.append(error)
        ready.set()
        if not failure:
            loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    if not ready.wait(start_timeout):
        raise TimeoutError(f"{name} did not start within {start_timeout:.0f} s")
    if failure:
        thread.join()
        raise failure[0]
    service = outcome[0]
    try:
        yield service
    finally:
        asyncio.run_coroutine_threadsafe(stop(service), loop).result(STOP_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT_S)
