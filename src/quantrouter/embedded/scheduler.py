"""Which models are resident, within a memory budget that stands in for VRAM, as Ollama schedules them.

Mirrors ollama/ollama `server/sched.go` (docs/ollama.md §3):
- a load first reserves an estimate (file size, f16 KV cache for its `num_ctx`, compute graph), then,
  once llama.cpp has loaded it, is charged what llama.cpp reports it allocated, as Ollama's newer
  servers charge the backend's own memory layout; later loads of the same model and `num_ctx` reserve
  that figure from the start. A different `num_ctx` reloads the model (`needsReload`);
- when a load does not fit, idle models are evicted least recently used first; when none is idle
  the load waits for one to become idle; a load bigger than the whole budget fails at once;
- after a request, a model stays for its keep_alive (`0` unloads it at once, negative keeps it);
- requests for one model run one at a time behind a bounded queue (`OLLAMA_MAX_QUEUE` → 503).

All state lives on the event loop; only loading and freeing a model run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from quantrouter.embedded.errors import BadRequestError, ModelLoadError, ServerBusyError
from quantrouter.embedded.registry import ModelEntry

__all__ = ["FOREVER", "Lease", "ResidentModel", "Scheduler", "parse_keep_alive"]

NS_PER_S = 1_000_000_000
# keep_alive < 0 keeps a model loaded; Ollama stores it as time.Duration(math.MaxInt64) (~292 years).
FOREVER = math.inf
_GO_MAX_DURATION_S = (2**63 - 1) / NS_PER_S
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

# A model handle and the bytes llama.cpp allocated for it.
Loader = Callable[[ModelEntry, int], tuple[Any, int]]
Closer = Callable[[Any], None]


def parse_keep_alive(value: object) -> float:
    """Ollama's `keep_alive`: a number is seconds, a string a Go duration ("10m", "1h30m"); <0 → forever."""
    if isinstance(value, bool):
        raise BadRequestError(f"invalid keep_alive {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_go_duration(value)
    else:
        raise BadRequestError(f"invalid keep_alive {value!r}")
    return FOREVER if seconds < 0 else seconds


def _parse_go_duration(text: str) -> float:
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body.lstrip("+-")
    try:
        return sign * float(body)  # a bare number of seconds, as OLLAMA_KEEP_ALIVE accepts
    except ValueError:
        pass
    parts = _GO_DURATION_PART.findall(body)
    if not parts or "".join(number + unit for number, unit in parts) != body:
        raise BadRequestError(f'time: invalid duration "{text}"')
    return sign * sum(float(number) * _GO_UNITS[unit] for number, unit in parts)


@dataclass(frozen=True, slots=True)
class ResidentModel:
    """One loaded model as `/api/ps` reports it."""

    entry: ModelEntry
    size: int
    num_ctx: int
    expires_at: datetime
    busy: bool


@dataclass(frozen=True, slots=True)
class Lease:
    """A model held for one request: the llama.cpp handle and how long getting it took."""

    model: Any
    load_duration_ns: int


@dataclass(eq=False)
class _Runner:
    entry: ModelEntry
    num_ctx: int
    reserved: int
    keep_alive: float
    model: Any = None
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)
    idle_since_wall: datetime = field(default_factory=lambda: datetime.now().astimezone())
    timer: asyncio.TimerHandle | None = None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def expires_at(self) -> datetime:
        """When the idle timer fires; for a busy model an estimate, now + keep_alive (as Ollama)."""
        base = datetime.now().astimezone() if self.busy else self.idle_since_wall
        return base + timedelta(seconds=min(self.keep_alive, _GO_MAX_DURATION_S))


@dataclass(eq=False)
class _Slot:
    """One model's turn-taking: the running request holds `lock`, at most max_queue wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0


class Scheduler:
    """Loads, shares and evicts models within `budget_bytes`."""

    def __init__(self, budget_bytes: int, max_queue: int, default_keep_alive: float,
                 loader: Loader, closer: Closer) -> None:
        self.budget_bytes = budget_bytes
        self._max_queue = max_queue
        self._default_keep_alive = default_keep_alive
        self._loader = loader
        self._closer = closer
        self._runners: dict[str, _Runner] = {}
        self._slots: dict[str, _Slot] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._charged: dict[tuple[str, int], int] = {}
        # Since start: models loaded, and resident models unloaded to make room for another.
        self.loads = 0
        self.evictions = 0

    def free_bytes(self) -> int:
        """Budget not reserved by resident or loading models."""
        return self.budget_bytes - sum(r.reserved for r in self._runners.values())

    def resident(self) -> list[ResidentModel]:
        """Loaded models, latest expiry first, as `/api/ps` sorts them."""
        models = [ResidentModel(r.entry, r.reserved, r.num_ctx, r.expires_at(), r.busy)
                  for r in self._runners.values() if r.loaded]
        return sorted(models, key=lambda m: m.expires_at, reverse=True)

    def queued(self, name: str) -> int:
        """Requests waiting for model `name`'s turn (not counting the one it is serving)."""
        slot = self._slots.get(name)
        return slot.waiting if slot is not None else 0

    def required_bytes(self, entry: ModelEntry, num_ctx: int) -> int:
        """What a load reserves: what llama.cpp allocated last time, else the estimate."""
        known = self._charged.get((entry.name, num_ctx))
        return known if known is not None else entry.info.estimated_bytes(entry.size, num_ctx)

    @contextlib.asynccontextmanager
    async def acquire(self, entry: ModelEntry, num_ctx: int, keep_alive: float | None) -> AsyncIterator[Lease]:
        """Wait for this model's turn, load it if needed, and hold it for one request."""
        slot = self._slots.setdefault(entry.name, _Slot())
        if slot.lock.locked() and slot.waiting >= self._max_queue:
            raise ServerBusyError()
        slot.waiting += 1
        try:
            await slot.lock.acquire()
        finally:
            slot.waiting -= 1
        try:
            started = time.perf_counter_ns()
            runner = await self._ensure_loaded(entry, num_ctx)
            load_ns = time.perf_counter_ns() - started
            if keep_alive is not None:
                runner.keep_alive = keep_alive  # an explicit value replaces the runner's (useLoadedRunner)
            self._cancel_timer(runner)
            runner.busy = True
            try:
                yield Lease(runner.model, load_ns)
            finally:
                runner.busy = False
                self._went_idle(runner)
        finally:
            slot.lock.release()
            self._notify()

    async def unload(self, entry: ModelEntry) -> None:
        """Unload `entry` once its current request (if any) is done; a no-op when not resident."""
        slot = self._slots.setdefault(entry.name, _Slot())
        async with slot.lock:
            runner = self._runners.get(entry.name)
            if runner is not None and runner.loaded:
                await self._unload(runner)

    async def close(self) -> None:
        """Unload everything, each model once the request holding it is done (its thread may still be
        decoding), and wait for the worker threads that free models."""
        for runner in list(self._runners.values()):
            await self.unload(runner.entry)
        while self._background:
            await asyncio.gather(*self._background)

    async def _ensure_loaded(self, entry: ModelEntry, num_ctx: int) -> _Runner:
        runner = self._runners.get(entry.name)
        if runner is not None and runner.num_ctx == num_ctx:
            return runner
        if runner is not None:
            await self._unload(runner)  # num_ctx changed: Ollama reloads (needsReload)
        need = self.required_bytes(entry, num_ctx)
        if need > self.budget_bytes:
            raise ModelLoadError(
                f"model '{entry.name}' needs {need} bytes ({entry.size} weights + KV cache and compute buffer for "
                f"num_ctx {num_ctx}) but the memory budget is {self.budget_bytes} bytes")
        while need > self.free_bytes():
            victim = self._least_recently_used_idle()
            if victim is not None:
                self.evictions += 1
                await self._unload(victim)
            else:
                await self._wait_for_change()
        self.loads += 1
        runner = _Runner(entry, num_ctx, need, self._default_keep_alive)
        self._runners[entry.name] = runner  # reserve before the first await so others see it
        task = asyncio.ensure_future(asyncio.to_thread(self._loader, entry, num_ctx))
        try:
            model, charged = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._adopt_abandoned_load(runner, done))
            raise
        except Exception as error:
            self._drop(runner)
            raise ModelLoadError(f"llama.cpp could not load {entry.path.name}: {error}") from error
        self._charge(runner, model, charged)
        await self._evict_overflow(runner)
        return runner

    def _charge(self, runner: _Runner, model: Any, charged: int) -> None:
        """Book what llama.cpp really allocated in place of the estimate, and remember it."""
        runner.model = model
        runner.reserved = charged
        self._charged[(runner.entry.name, runner.num_ctx)] = charged

    async def _evict_overflow(self, loaded: _Runner) -> None:
        """A load that took more than its estimate pushes idle models out until the budget holds."""
        while self.free_bytes() < 0:
            victim = self._least_recently_used_idle(besides=loaded)
            if victim is None:
                return
            self.evictions += 1
            await self._unload(victim)

    def _adopt_abandoned_load(self, runner: _Runner, task: asyncio.Future[Any]) -> None:
        """A load whose request went away still finishes: keep it as an idle model, or drop it."""
        if task.cancelled() or task.exception() is not None:
            self._drop(runner)
            return
        model, charged = task.result()
        self._charge(runner, model, charged)
        self._went_idle(runner)

    def _least_recently_used_idle(self, besides: _Runner | None = None) -> _Runner | None:
        idle = [r for r in self._runners.values() if r.loaded and not r.busy and r is not besides]
        return min(idle, key=lambda r: r.last_used, default=None)

    def _went_idle(self, runner: _Runner) -> None:
        runner.last_used = time.monotonic()
        runner.idle_since_wall = datetime.now().astimezone()
        if runner.keep_alive == 0:
            self._unload_soon(runner)
        elif runner.keep_alive != FOREVER:
            loop = asyncio.get_running_loop()
            runner.timer = loop.call_later(runner.keep_alive, self._expire, runner)
        self._notify()

    def _expire(self, runner: _Runner) -> None:
        runner.timer = None
        if not runner.busy and self._runners.get(runner.entry.name) is runner:
            self._unload_soon(runner)

    def _unload_soon(self, runner: _Runner) -> None:
        """Drop it from the books now and free its memory in a worker thread."""
        model = runner.model
        self._drop(runner)
        if model is not None:
            self._spawn(asyncio.to_thread(self._closer, model))

    async def _unload(self, runner: _Runner) -> None:
        model = runner.model
        self._drop(runner)
        if model is not None:
            await asyncio.to_thread(self._closer, model)

    def _drop(self, runner: _Runner) -> None:
        """Forget a runner now, so the budget and /api/ps reflect it before its memory is freed."""
        self._cancel_timer(runner)
        if self._runners.get(runner.entry.name) is runner:
            del self._runners[runner.entry.name]
        self._notify()

    @staticmethod
    def _cancel_timer(runner: _Runner) -> None:
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None

    async def _wait_for_change(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
