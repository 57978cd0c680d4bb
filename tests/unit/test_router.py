"""The router on its own, without gRPC: fallback, breaker, admission and error translation.

The backend is a real local HTTP server speaking Ollama's protocol with canned NDJSON
(bench/fixtures/canned_ollama.py), reached through the real `ollama` client. Faults are injected on
purpose, per tag, by a middleware in front of that server: an HTTP error status with Ollama's
`{"error": …}` body, or an error line in the middle of a stream, as Ollama sends them. Metrics are
read back from a fresh registry.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import pytest
from aiohttp import web
from bench.fixtures.canned_ollama import FAMILY, VARIANTS, CannedOllama
from prometheus_client import CollectorRegistry

from quantrouter.backend import OllamaBackend
from quantrouter.config import BackendSettings, CatalogSettings, LimitSettings
from quantrouter.errors import (
    BackendBusy,
    BackendFailed,
    BackendModelMissing,
    BackendRejected,
    BackendUnavailable,
    Overloaded,
    QuantrouterError,
)
from quantrouter.inventory import Inventory
from quantrouter.loads import LOAD_MARGIN
from quantrouter.memory import MemoryProbe, StaticSource
from quantrouter.metrics import OTHER, Metrics
from quantrouter.policy import (
    LOAD_WINDOW_S,
    SHARING_LEVELS,
    SURGE_WINDOW_S,
    PolicyConfig,
    RoutingRequest,
    runners_tolerated,
)
from quantrouter.router import LOAD_BUCKET_S, Job, LoadWindow, Router
from quantrouter.throughput import Observation, ThroughputTable
from quantrouter.values import Completion, Decision, FailureKind, Preference
from tests.support import ManualClock

Q8, Q5, Q4 = (v.tag for v in VARIANTS)
# Memory does not decide anything here: every canned variant is resident and fits.
CAPACITY = 1 << 50
BANDWIDTH = 1e12
TOKENS = 4
# How long a mid-stream fault waits for the caller to have its text (it takes milliseconds).
TEXT_DELIVERED_TIMEOUT_S = 30.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Fault:
    """An injected failure: answer `status`, or (status 0) stream `chunks` tokens and then an error line, once
    the test sets `text_delivered` (text and error in one read are all "before the first token", and rightly
    fall back; a fixed pause between them bet on how fast the relay passes the text on)."""

    status: int = 0
    chunks: int = 0
    message: str = "injected fault"
    text_delivered: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Canned:
    url: str
    faults: dict[str, Fault] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    loading: set[str] = field(default_factory=set)  # runners /api/ps leaves out: still loading, as Ollama does
    runner: web.AppRunner | None = None


async def _fail(request: web.Request, model: str, fault: Fault) -> web.StreamResponse:
    if fault.status:
        return web.json_response({"error": fault.message}, status=fault.status)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for _ in range(fault.chunks):
        await response.write(json.dumps({"model": model, "response": "tok", "done": False}).encode() + b"\n")
    if fault.chunks:
        await asyncio.wait_for(fault.text_delivered.wait(), TEXT_DELIVERED_TIMEOUT_S)
    await response.write(json.dumps({"error": fault.message}).encode() + b"\n")
    await response.write_eof()
    return response


@pytest.fixture
async def canned() -> AsyncIterator[Canned]:
    state = Canned("")

    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ("/api/generate", "/api/chat"):
            model = (await request.json()).get("model", "")
            state.calls.append(model)
            if model in state.faults:
                return await _fail(request, model, state.faults[model])
        response = await handler(request)
        if request.path == "/api/ps" and state.loading:
            assert isinstance(response, web.Response) and response.text is not None
            listed = json.loads(response.text)
            listed["models"] = [m for m in listed["models"] if m["model"] not in state.loading]
            return web.json_response(listed)
        return response

    app = CannedOllama().app()
    app.middlewares.append(inject)
    state.runner = web.AppRunner(app, access_log=None)
    await state.runner.setup()
    await web.TCPSite(state.runner, "127.0.0.1", 0).start()
    state.url = f"http://127.0.0.1:{state.runner.addresses[0][1]}"
    yield state
    await state.runner.cleanup()


DEFAULT_POLICY = PolicyConfig()


@pytest.fixture
async def make_router(canned: Canned) -> AsyncIterator[Callable[..., Awaitable[Router]]]:
    backends: list[OllamaBackend] = []

    async def make(clock: Callable[[], float] = time.monotonic, policy: PolicyConfig = DEFAULT_POLICY,
                   **limits: int) -> Router:
        backend = OllamaBackend(BackendSettings(canned.url, connect_timeout=2.0, read_timeout=10.0))
        backends.append(backend)
        inventory = Inventory(backend, CatalogSettings())
        assert await inventory.refresh()
        probe = MemoryProbe(StaticSource(CAPACITY, inventory.resident_vram), None, 1.0)
        return Router(backend, inventory, probe, ThroughputTable(0.3, BANDWIDTH), Metrics(CollectorRegistry()),
                      LimitSettings(**limits), policy, reserve_bytes=0, clock=clock)

    yield make
    for backend in backends:
        await backend.close()


def _request(preference: Preference = Preference.QUALITY) -> RoutingRequest:
    return RoutingRequest(FAMILY, preference, num_predict=TOKENS)


JOB = Job(prompt="Why is the sky blue?", options={"num_predict": TOKENS})


async def _events(router: Router, request: RoutingRequest | None = None) -> list[Decision | str | Completion]:
    return [event async for event in router.stream(request or _request(), JOB)]


async def _until_called(canned: Canned) -> None:
    """Until the backend has received a generate request."""
    async with asyncio.timeout(10):
        while not canned.calls:
            await asyncio.sleep(0.01)


def _busy_variants(router: Router) -> dict[str, int]:
    """The streams each variant serves, as the policy sees them in the family's candidates (only busy ones)."""
    return {c.variant.tag: c.in_flight for c in router.candidates(router.inventory.snapshot, FAMILY) if c.in_flight}


def _sample(router: Router, name: str, **labels: str) -> float:
    assert isinstance(router.metrics, Metrics)
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_stream_is_its_decision_then_text_then_the_measured_completion(
        make_router: Callable[..., Awaitable[Router]]) -> None:
    router = await make_router()
    events = await _events(router)
    decision, *texts, completion = events
    assert isinstance(decision, Decision) and decision.chosen is not None and decision.chosen.tag == Q8
    assert texts and all(isinstance(t, str) for t in texts)
    assert isinstance(completion, Completion)
    assert (completion.variant, completion.generated_tokens) == (Q8, TOKENS)
    assert completion.tokens_per_second > 0
    assert router.throughput.snapshot().estimate(Q8, VARIANTS[0].size_bytes, {}).measured
    assert _sample(router, "quantrouter_requests_total", model_name=FAMILY, target_model_name=Q8,
                   quantization="Q8_0", preference="quality", code="OK") == 1
    assert _sample(router, "quantrouter_generated_tokens_total", model_name=FAMILY, target_model_name=Q8,
                   quantization="Q8_0") == TOKENS
    assert router.in_flight == 0


async def test_the_candidate_table_is_kept_until_a_completion_or_a_catalog_change(
        make_router: Callable[..., Awaitable[Router]]) -> None:
    """A family's candidates are built once per catalog and speed snapshot, and what a completed request measured
    or a new catalog says shows in the very next request's candidates."""
    router = await make_router()
    catalog = router.inventory.snapshot
    first = router.candidates(catalog, FAMILY)
    assert all(a is b for a, b in zip(first, router.candidates(catalog, FAMILY), strict=True)), "built once"
    assert all(c.variant.resident and not c.speed.measured for c in first)
    await _events(router)  # QUALITY: a completion on Q8
    measured = {c.variant.tag: c.speed.measured for c in router.candidates(catalog, FAMILY)}
    assert measured == {Q8: True, Q5: False, Q4: False}
    evicted = catalog.with_residency({})
    assert not any(c.variant.resident for c in router.candidates(evicted, FAMILY))


@pytest.mark.parametrize(("status", "reason"), [(404, "VARIANT_MISSING"), (500, "BACKEND_FAILED"),
                                                (503, "BACKEND_BUSY")])
async def test_a_variant_failing_before_its_first_token_falls_back_once(
        canned: Canned, make_router: Callable[..., Awaitable[Router]], status: int, reason: str) -> None:
    canned.faults[Q8] = Fault(status)
    router = await make_router()
    events = await _events(router)
    decisions = [e for e in events if isinstance(e, Decision)]
    assert [d.chosen.tag for d in decisions if d.chosen] == [Q8, Q5]
    assert [d.fallback for d in decisions] == [False, True]
    assert isinstance(events[-1], Completion) and events[-1].variant == Q5
    assert canned.calls == [Q8, Q5]
    assert _sample(router, "quantrouter_fallbacks_total", model_name=FAMILY, target_model_name=Q8,
                   reason=reason) == 1
    assert _sample(router, "quantrouter_route_substitutions_total", model_name=FAMILY, target_model_name=Q5,
                   kind="fallback") == 1


async def test_when_the_fallback_fails_too_its_error_ends_the_stream(
        canned: Canned, make_router: Callable[..., Awaitable[Router]]) -> None:
    canned.faults[Q8] = Fault(500)
    canned.faults[Q5] = Fault(404)
    router = await make_router()
    with pytest.raises(BackendModelMissing):
        await _events(router)
    assert canned.calls == [Q8, Q5]  # one fallback, never a second
    assert _sample(router, "quantrouter_requests_total", model_name=FAMILY, target_model_name=Q5,
                   quantization="Q5_K_M", preference="quality", code="NOT_FOUND") == 1
    assert router.in_flight == 0


async def test_an_error_after_the_first_token_ends_the_stream_without_fallback(
        canned: Canned, make_router: Callable[..., Awaitable[Router]]) -> None:
    fault = canned.faults[Q8] = Fault(chunks=2, message="CUDA error: out of memory")
    router = await make_router()
    received: list[Decision | str | Completion] = []
    with pytest.raises(BackendFailed, match="mid-stream: CUDA error") as caught:
        async for event in router.stream(_request(), JOB):
            received.append(event)
            if isinstance(event, str):
                fault.text_delivered.set()  # the model fails only now, after its first text
    assert caught.value.started
    assert isinstance(received[0], Decision) and len(received) >= 2
    assert "".join(str(e) for e in received[1:]) == "toktok"
    assert canned.calls == [Q8]
    assert _sample(router, "quantrouter_requests_total", model_name=FAMILY, target_model_name=Q8,
                   quantization="Q8_0", preference="quality", code="UNAVAILABLE") == 1


async def test_repeated_failures_open_the_variants_breaker(
        canned: Canned, make_router: Callable[..., Awaitable[Router]]) -> None:
    canned.faults[Q8] = Fault(500)
    router = await make_router(breaker_failures=2)
    for _ in range(2):
        assert isinstance((await _events(router))[-1], Completion)  # served by the fallback each time
    assert _sample(router, "quantrouter_breaker_trips_total", model_name=FAMILY, target_model_name=Q8) == 1
    decision = router.decide(_request())
    assert decision.chosen is not None and decision.chosen.tag == Q5
    [q8] = [a for a in decision.candidates if a.tag == Q8]
    assert not q8.feasible and "cool-down" in q8.rejection
    canned.calls.clear()
    await _events(router)
    assert canned.calls == [Q5]  # the open breaker keeps requests off the failing variant


@pytest.mark.parametrize("status", [400, 503])
async def test_errors_that_are_not_the_variants_fault_never_open_its_breaker(
        canned: Canned, make_router: Callable[..., Awaitable[Router]], status: int) -> None:
    canned.faults = {v.tag: Fault(status) for v in VARIANTS}
    router = await make_router(breaker_failures=1)
    for _ in range(3):
        with pytest.raises(BackendRejected if status == 400 else BackendBusy):
            await _events(router)
    assert not any(router.breaker.is_open(v.tag, 0.0) for v in VARIANTS)
    assert _sample(router, "quantrouter_breaker_trips_total", model_name=FAMILY, target_model_name=Q8) == 0


@pytest.mark.parametrize(("status", "error", "code"), [
    (400, BackendRejected, "INVALID_ARGUMENT"),
    (404, BackendModelMissing, "NOT_FOUND"),
    (500, BackendFailed, "UNAVAILABLE"),
    (503, BackendBusy, "RESOURCE_EXHAUSTED"),
])
async def test_backend_statuses_become_the_routers_errors(
        canned: Canned, make_router: Callable[..., Awaitable[Router]], status: int,
        error: type[QuantrouterError], code: str) -> None:
    canned.faults = {v.tag: Fault(status, message=f"status {status}") for v in VARIANTS}
    router = await make_router()
    with pytest.raises(error, match=f"status {status}") as caught:
        await _events(router)
    assert caught.value.code.name == code
    if status == 503:
        assert caught.value.retry_after is not None


async def test_an_unreachable_backend_is_unavailable_and_never_the_variants_fault(
        canned: Canned, make_router: Callable[..., Awaitable[Router]]) -> None:
    router = await make_router(breaker_failures=1)
    assert canned.runner is not None
    await canned.runner.cleanup()  # the backend goes away after the catalog was read
    with pytest.raises(BackendUnavailable):
        await _events(router)
    assert not router.breaker.is_open(Q8, 0.0)
    assert router.inventory.snapshot.variant(Q8) is not None  # the last catalog is kept


async def test_admission_sheds_beyond_the_in_flight_limits(make_router: Callable[..., Awaitable[Router]]) -> None:
    for limits in ({"max_in_flight": 1}, {"max_in_flight_per_family": 1}):
        router = await make_router(**limits)
        first = router.stream(_request(), JOB)
        assert isinstance(await anext(first), Decision)  # one stream open, waiting at its decision
        with pytest.raises(Overloaded, match="limit of 1 streams") as caught:
            await _events(router, _request(Preference.LATENCY))
        assert caught.value.retry_after is not None
        assert _sample(router, "quantrouter_requests_total", model_name=FAMILY, target_model_name=OTHER,
                       quantization=OTHER, preference="latency", code="RESOURCE_EXHAUSTED") == 1
        assert router.in_flight == 1
        await first.aclose()
        assert router.in_flight == 0
        assert isinstance((await _events(router))[-1], Completion)  # the slot is free again


async def test_a_cancelled_stream_releases_its_slot_and_counts_as_cancelled(
        make_router: Callable[..., Awaitable[Router]]) -> None:
    router = await make_router()
    started = asyncio.Event()

    async def consume() -> None:
        async with aclosing(router.stream(_request(), JOB)) as stream:  # as the servicer's relay holds it
            async for _ in stream:
                started.set()
                await asyncio.sleep(60)

    task = asyncio.create_task(consume())
    await started.wait()
    assert router.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert router.in_flight == 0
    assert _sample(router, "quantrouter_requests_total", model_name=FAMILY, target_model_name=Q8,
                   quantization="Q8_0", preference="quality", code="CANCELLED") == 1


async def test_the_backend_request_starts_while_the_decision_is_out_and_ends_with_the_stream(
        canned: Canned, make_router: Callable[..., Awaitable[Router]]) -> None:
    """The first token is not held behind sending the decision; a caller gone at the decision leaves nothing."""
    router = await make_router()
    stream = router.stream(_request(), JOB)
    assert isinstance(await anext(stream), Decision)  # the caller holds the decision and asks for nothing more
    await _until_called(canned)
    assert canned.calls == [Q8]
    assert _busy_variants(router) == {Q8: 1}
    await stream.aclose()
    assert router.in_flight == 0 and _busy_variants(router) == {} and router.memory_view().backlog == ()
    assert _sample(router, "quantrouter_requests_total", model_name=FAMILY, target_model_name=Q8,
                   quantization="Q8_0", preference="quality", code="CANCELLED") == 1


async def test_the_policy_sees_each_stream_in_flight_with_its_slo_and_the_load_routed_lately(
        make_router: Callable[..., Awaitable[Router]]) -> None:
    """What a new runner must not break (deadline, rate floor) and the recent offered load reach the policy."""
    router = await make_router()
    request = replace(_request(), time_remaining=20.0, min_tokens_per_second=5.0)
    async with aclosing(router.stream(request, JOB)) as stream:
        decision = await anext(stream)
        assert isinstance(decision, Decision) and decision.chosen is not None
        assert isinstance(await anext(stream), str)  # the first text: the stream is in flight
        view = router.memory_view()
        (work,) = view.in_flight
        service = decision.chosen.expected_seconds - decision.chosen.queue_seconds
        assert work.service_seconds == pytest.approx(service)
        assert work.tokens_per_second == decision.chosen.tokens_per_second
        assert work.min_tokens_per_second == 5.0
        assert work.time_left is not None and 0 < work.time_left <= 20.0
        assert view.offered_load == pytest.approx(service / LOAD_WINDOW_S)
        assert [event async for event in stream]
    assert router.memory_view().in_flight == ()


async def test_a_stream_counts_in_the_backlog_for_no_longer_than_its_deadline(
        make_router: Callable[..., Awaitable[Router]]) -> None:
    """The router cancels the engine's request at the caller's deadline, so a stream's remaining work that lies
    beyond it is never done: the backlog and its variant's queue count only the time left."""
    clock = ManualClock()
    router = await make_router(clock=clock)
    request = replace(_request(), time_remaining=60.0)
    async with aclosing(router.stream(request, JOB)) as stream:
        decision = await anext(stream)
        assert isinstance(decision, Decision) and decision.chosen is not None
        assert isinstance(await anext(stream), str)
        clock.now += 60.0 - decision.chosen.expected_seconds / 10  # the stream fell behind: its deadline is near
        view = router.memory_view()
        (work,) = view.in_flight
        assert work.time_left is not None and work.time_left < work.service_seconds * (1 - work.done)
        assert view.backlog == (pytest.approx(work.time_left),)
        (queued,) = [c.queued_seconds for c in router.candidates(router.inventory.snapshot, FAMILY) if c.in_flight]
        assert queued == pytest.approx(work.time_left)
        assert [event async for event in stream]


async def test_the_policy_sees_the_rate_of_routed_requests_with_an_slo_by_the_runners_each_one_bears(
        make_router: Callable[..., Awaitable[Router]]) -> None:
    """A request with neither a deadline nor a rate floor adds to the offered load only; one with either counts once,
    under the runners time-slicing the GPU its SLO bears by its own decision's estimates (`runners_tolerated`); one
    that bears more than `SHARING_LEVELS` is not kept. The charge is on: the router sums these only for it."""
    router = await make_router(policy=PolicyConfig(tight_arrivals=0.2))
    async with aclosing(router.stream(_request(), JOB)) as stream:  # its speed measured: the floors below are near it
        assert [event async for event in stream]
    bears: list[int] = []
    for divisor, deadline in ((1.5, None), (2.5, None), (0.0, 3600.0)):
        # The estimate the request's own decision will see: each finished request moves the measured speed (real
        # timing over HTTP), so a floor set from the first request's speed could land either side of a bound.
        current = router.decide(_request()).chosen
        assert current is not None
        floor = current.tokens_per_second / divisor if divisor else 0.0
        request = replace(_request(), min_tokens_per_second=floor, time_remaining=deadline)
        async with aclosing(router.stream(request, JOB)) as stream:
            decision = await anext(stream)
            assert isinstance(decision, Decision) and decision.chosen is not None
            bears.append(runners_tolerated(decision.chosen, request.time_remaining, request.min_tokens_per_second))
            assert [event async for event in stream]
    assert bears[:2] == [1, 2] and bears[2] > SHARING_LEVELS
    view = router.memory_view()
    assert view.tight_rates == pytest.approx((1 / LOAD_WINDOW_S, 1 / LOAD_WINDOW_S, 0.0, 0.0))
    assert view.offered_load > 0


class _RecordingTable(ThroughputTable):
    """The real table, which also keeps each observation it is fed (to read what the router noted)."""

    def __init__(self) -> None:
        super().__init__(0.3, BANDWIDTH)
        self.seen: list[tuple[str, Observation]] = []

    def observe(self, tag: str, observation: Observation) -> None:
        self.seen.append((tag, observation))
        super().observe(tag, observation)


async def test_a_speed_sample_says_how_many_runners_it_shared_the_gpu_with_over_its_life(
        make_router: Callable[..., Awaitable[Router]]) -> None:
    """Q8_0 streams while Q4_K_M starts and finishes beside it: both samples say 2 runners, although Q8_0 ends
    alone; a later stream alone says 1 (the table then keeps shared samples from moving its estimates)."""
    router = await make_router()
    router.throughput = table = _RecordingTable()
    async with aclosing(router.stream(replace(_request(), pinned_tag=Q8), JOB)) as first:
        assert isinstance(await anext(first), Decision)
        assert isinstance(await anext(first), str)  # Q8_0 is streaming
        assert [event async for event in router.stream(replace(_request(), pinned_tag=Q4), JOB)]
        assert [event async for event in first]
    assert [event async for event in router.stream(replace(_request(), pinned_tag=Q5), JOB)]
    assert [(tag, o.busy_runners) for tag, o in table.seen] == [(Q4, 2), (Q8, 2), (Q5, 1)]


async def _leave_while_loading(canned: Canned, router: Router) -> Decision:
    """A QUALITY caller routed to Q8_0, not resident, leaves at its decision once the backend has the request:
    Ollama's load runs on without it, listed by /api/ps only once done (the injected `loading`)."""
    canned.loading = {v.tag for v in VARIANTS}
    assert await router.inventory.refresh(full=False)
    stream = router.stream(_request(), JOB)
    decision = await anext(stream)
    assert isinstance(decision, Decision) and decision.chosen is not None
    assert (decision.chosen.tag, decision.chosen.resident) == (Q8, False)
    await _until_called(canned)
    await stream.aclose()
    assert await router.inventory.refresh(full=False)  # the early /api/ps a cold stream asks for: still loading
    assert router.in_flight == 0 and not any(v.resident for v in router.inventory.snapshot.family(FAMILY))
    # NVML's free memory no longer holds the loading runner's bytes: nothing more fits.
    router.probe = MemoryProbe(StaticSource(1, lambda: 0), None, 1.0)
    return decision


@pytest.mark.parametrize(("then", "expected", "failure"), [
    ("nothing", Q8, None),  # still loading: its memory is explained, the next request joins it
    ("nearly overdue", Q8, None),  # within LOAD_MARGIN × its expected time: still remembered
    ("overdue", None, FailureKind.MEMORY),  # past LOAD_MARGIN × its expected time: forgotten
    ("listed, then evicted", None, FailureKind.MEMORY),  # /api/ps listed it: no longer a load of the router's
])
async def test_a_load_that_outlives_its_caller_is_remembered_until_listed_or_overdue(
        canned: Canned, make_router: Callable[..., Awaitable[Router]], then: str, expected: str | None,
        failure: FailureKind | None) -> None:
    """With neither residency nor a request in flight to explain the memory a load took, the policy would refuse
    every variant for memory; the router remembers the load it started and tells the policy (`loading`)."""
    clock = ManualClock()
    router = await make_router(clock=clock)
    left = await _leave_while_loading(canned, router)
    if then in ("nearly overdue", "overdue"):
        assert left.chosen is not None
        remembered = left.chosen.time_to_first_token * LOAD_MARGIN
        clock.now += remembered + 1.0 if then == "overdue" else remembered * 0.9
    elif then == "listed, then evicted":
        canned.loading.clear()
        assert await router.inventory.refresh(full=False)
        router.decide(_request())  # a decision sees it resident
        canned.loading = {v.tag for v in VARIANTS}
        assert await router.inventory.refresh(full=False)
    decision = router.decide(_request())
    assert (decision.chosen.tag if decision.chosen else None, decision.failure) == (expected, failure)
    if expected:
        q8 = next(a for a in decision.candidates if a.tag == Q8)
        assert q8.resident and not q8.queue_seconds and not q8.rejection
        assert all("needs" in a.rejection for a in decision.candidates if a.tag != Q8)


async def test_a_load_whose_stream_failed_is_forgotten(
        canned: Canned, make_router: Callable[..., Awaitable[Router]]) -> None:
    """A backend error on the stream says the runner is not there: nothing is left loading to explain memory."""
    router = await make_router()
    canned.loading = {v.tag for v in VARIANTS}
    canned.faults = {v.tag: Fault(500) for v in VARIANTS}
    assert await router.inventory.refresh(full=False)
    with pytest.raises(BackendFailed):
        await _events(router)
    assert canned.calls == [Q8, Q5]  # the fallback's load failed too
    router.probe = MemoryProbe(StaticSource(1, lambda: 0), None, 1.0)
    assert router.decide(_request()).failure is FailureKind.MEMORY


def test_the_load_window_counts_what_was_routed_within_it() -> None:
    """Service seconds count for the window's length (give or take a bucket), then leave it, with or without
    routings in between."""
    window = LoadWindow()
    window.add(100.2, 3.0)
    window.add(101.7, 6.0)
    assert window.per_second(102.0) == pytest.approx(9.0 / LOAD_WINDOW_S)
    assert window.per_second(100.0 + LOAD_WINDOW_S - LOAD_BUCKET_S) == pytest.approx(9.0 / LOAD_WINDOW_S)
    assert window.per_second(100.5 + LOAD_WINDOW_S) == pytest.approx(6.0 / LOAD_WINDOW_S)
    assert window.per_second(102.0 + LOAD_WINDOW_S) == 0.0
    for i in range(1000):
        window.add(200.0 + i / 100, 0.5)
    assert window.per_second(210.0) == pytest.approx(500.0 / LOAD_WINDOW_S)
    assert window.per_second(10_000.0) == 0.0


def test_the_surge_reading_is_the_newest_seconds_of_the_load_window() -> None:
    """A burst's first seconds: quiet over the whole window, loaded over its newest `SURGE_WINDOW_S`."""
    window = LoadWindow()
    window.add(100.2, 3.0)
    for i in range(8):
        window.add(125.0 + i / 2, 2.0)
    assert window.per_second(129.0) == pytest.approx(19.0 / LOAD_WINDOW_S)
    assert window.per_second(129.0, SURGE_WINDOW_S) == pytest.approx(16.0 / SURGE_WINDOW_S)
    assert window.per_second(140.0, SURGE_WINDOW_S) == 0.0
    assert window.per_second(140.0) == pytest.approx(16.0 / LOAD_WINDOW_S)
