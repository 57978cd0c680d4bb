"""Several simulated Ollama nodes behind one fleet router: the multi-node simulation.

Each node is a `Simulation` of its own GPU (bench/sim/engine.py: Ollama's memory prediction and load rule,
the true speed curve, parallel runners, its own other tenants); the nodes step through time together and
a dispatcher sends each arrival to one (node, variant), which that node then serves as a pinned request.

quantrouter-fleet is the production path: every node reports its state as the node router's
`WatchCapacity` would (`quantrouter.capacity.node_capacity`, sent when `capacity.changed` says so, polled
every `CHANGE_POLL_S` and at least every report interval), the fleet reads each report back through
`fleet.state.read_report`, and `fleet.choice.choose` picks the pair from those reports, stale by up to a
poll period, plus what the fleet router itself sent each node since its last report (`fleet.state.with_routed`,
as `FleetRouter` books its own forwarded streams). Reports are evaluated at the poll tick before each
arrival, not at every tick: a report sent at a tick in between would only have been older than the one
taken. The balancers see only their own bookkeeping (and, behind one, each node router its own node, as
it does in production); the oracle alone reads the truth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from bench.sim.engine import NUM_CTX, Choice, Outcome, RequestResult, RouterView, RunResult, Simulation
from bench.sim.hardware import DEFAULT_ENGINE, OLLAMA_MINIMUM_MEMORY, EngineSpec, FamilySpec, GpuSpec
from bench.sim.policies import (
    DEFAULT_QUANT,
    QuantRouter,
    remaining_by_stream,
    slo_value,
    streams_of,
)
from bench.sim.workload import Request, meets_floor
from quantrouter.capacity import BACKLOG_STEP_S, CHANGE_POLL_S, changed, node_capacity
from quantrouter.catalog import VariantInfo
from quantrouter.config import FleetSettings, LimitSettings
from quantrouter.fleet.choice import choose
from quantrouter.fleet.state import NodeState, read_report, with_routed
from quantrouter.fleet.state import Routed as Sent
from quantrouter.memory import GpuMemory, MemorySnapshot
from quantrouter.policy import (
    CandidateInput,
    MemoryView,
    PolicyConfig,
    RoutingRequest,
    decide,
    offered_load,
    queued_by_variant,
)
from quantrouter.quant import parse_quantization
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.values import Preference

# The fleet router's defaults: a report at least this often (FleetSettings.report_interval), and each node
# router's in-flight limit (LimitSettings.max_in_flight), which a report carries.
REPORT_INTERVAL_S = FleetSettings().report_interval
MAX_IN_FLIGHT = LimitSettings().max_in_flight


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node: its name, its GPU, and its other tenants' memory, (time, bytes wanted) steps."""

    name: str
    gpu: GpuSpec
    tenant: tuple[tuple[float, int], ...]


@dataclass(frozen=True, slots=True)
class Routed:
    """A dispatcher's pick: the node and the variant, or neither with the reason; `sent`, the stream as the
    fleet router books it until the node's next report (quantrouter-fleet only)."""

    node: str | None
    tag: str | None
    reason: str
    sent: Sent | None = None


@dataclass(frozen=True, slots=True)
class FleetView:
    """What a dispatcher may read at an arrival. `reports` is what the nodes last reported (quantrouter-fleet's
    only input); `open_streams` the requests each node holds, which a load balancer counts itself; `truth` the
    nodes themselves: the oracle's truth, and what a node's own router sees of its node (`Simulation.view`)."""

    now: float
    family: FamilySpec
    num_ctx: int
    reports: Mapping[str, NodeState]
    open_streams: Mapping[str, int]
    truth: Mapping[str, Simulation]


class Dispatcher(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def reads_reports(self) -> bool: ...

    def route(self, request: Request, view: FleetView) -> Routed: ...


def _default_tag(family: FamilySpec) -> str:
    return next(v.tag for v in family.variants if v.quant.name == DEFAULT_QUANT)


@dataclass(frozen=True, slots=True)
class RoundRobin:
    """Nodes in turn (arrival order), always the default quantization."""

    name: str = "round-robin + always-q4_K_M"
    reads_reports: bool = False

    def route(self, request: Request, view: FleetView) -> Routed:
        names = sorted(view.open_streams)
        return Routed(names[request.id % len(names)], _default_tag(view.family), "round robin")


@dataclass(frozen=True, slots=True)
class LeastLoaded:
    """The node with the fewest open requests (a load balancer's least-request rule, on its own exact counts;
    ties in turn), with the default quantization for every request unless `mapping` says otherwise: per
    preference, a variant and whether only the nodes with the most GPU memory take it (the hindsight search
    varies both)."""

    mapping: tuple[tuple[Preference, str, bool], ...] = ()
    name: str = "least-loaded + always-q4_K_M"
    reads_reports: bool = False

    def route(self, request: Request, view: FleetView) -> Routed:
        tag, largest_only = next(((t, only) for p, t, only in self.mapping if p is request.preference),
                                 (_default_tag(view.family), False))
        names = sorted(view.open_streams)
        if largest_only:
            most = max(view.truth[n].gpu.capacity_bytes for n in names)
            names = [n for n in names if view.truth[n].gpu.capacity_bytes == most]
        node = min(names, key=lambda n: (view.open_streams[n], (names.index(n) - request.id) % len(names)))
        return Routed(node, tag, "least loaded")


@dataclass(frozen=True, slots=True)
class NodeRoutersBehindLeastLoaded:
    """A plain least-request balancer in front of the node routers: the node by `LeastLoaded`'s rule, the
    variant by that node's own router as it decides on the request's arrival (bench/sim/policies.py's
    quantrouter on the node's own view). What the fleet tier's joint choice is measured against."""

    name: str = "least-loaded + node routers"
    reads_reports: bool = False
    # One for every node: it keeps each node router's own state (the loads it started) between requests.
    router: QuantRouter = field(default_factory=QuantRouter, compare=False, repr=False)

    def route(self, request: Request, view: FleetView) -> Routed:
        node = LeastLoaded().route(request, view).node
        assert node is not None
        choice = self.router.choose(request, view.truth[node].view())
        return Routed(node if choice.tag else None, choice.tag, choice.reason)


def routing_request(request: Request, family: FamilySpec, num_ctx: int) -> RoutingRequest:
    """The request as a client sends it: preference, lengths, constraints, and its deadline as time left."""
    floor = parse_quantization(request.min_quantization) if request.min_quantization else None
    return RoutingRequest(family.name, request.preference, prompt_tokens=request.prompt_tokens,
                          num_predict=request.output_tokens, num_ctx=num_ctx, min_quantization=floor,
                          min_tokens_per_second=request.min_tokens_per_second, time_remaining=request.deadline_s)


@dataclass(frozen=True, slots=True)
class QuantrouterFleet:
    """quantrouter's fleet router: `fleet.choice.choose` over the nodes' last reports."""

    config: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "quantrouter-fleet"
    reads_reports: bool = True

    def route(self, request: Request, view: FleetView) -> Routed:
        decision = choose(routing_request(request, view.family, view.num_ctx), view.reports, self.config)
        chosen = decision.chosen
        if chosen is None:
            return Routed(None, None, decision.reason_code)
        sent = Sent(chosen.tag, chosen.expected_seconds - chosen.queue_seconds, chosen.tokens_per_second,
                    request.deadline_s, request.min_tokens_per_second)
        return Routed(decision.node, chosen.tag, decision.reason_code, sent)


@dataclass(frozen=True, slots=True)
class FleetOracle:
    """Knows every node's true speeds, loads and queues now (not future arrivals): the (node, variant) that
    maximises `slo_value`, ties to the earlier finish; refuses when none meets the SLO."""

    name: str = "oracle-per-request"
    reads_reports: bool = False

    def route(self, request: Request, view: FleetView) -> Routed:
        best: tuple[float, float] = (0.0, -math.inf)
        pick = Routed(None, None, "no (node, variant) meets the SLO")
        for node, sim in sorted(view.truth.items()):
            for v in view.family.variants:
                if not meets_floor(request, v.quant):
                    continue
                prediction = sim.predict(request, v.tag)
                key = (slo_value(request, prediction, view.family.quality(v.tag)), -prediction.finish)
                if key[0] > 0 and key > best:
                    best, pick = key, Routed(node, v.tag, "oracle")
        return pick


# Every dispatcher the multi-node simulation compares, quantrouter-fleet first (the hindsight oracle is a search).
DISPATCHERS: tuple[Dispatcher, ...] = (QuantrouterFleet(), RoundRobin(), LeastLoaded(), NodeRoutersBehindLeastLoaded(),
                                       FleetOracle())


def node_candidates(view: RouterView) -> list[CandidateInput]:
    """The node's variants as its router prices them (`Router.candidates`): speeds from its own throughput
    table, the quant prior as quality (no simulated family is calibrated), its streams and their remaining
    seconds per variant."""
    family = view.family
    infos = [VariantInfo(v.tag, family.name, v.quant, v.size_bytes, family.parameter_count, family.architecture,
                         v.tag in view.resident, view.resident.get(v.tag, 0)) for v in family.variants]
    queued = queued_by_variant(remaining_by_stream(view))
    return [CandidateInput(info, speed, info.quant.quality, view.in_flight.get(info.tag, 0),
                           queued_seconds=queued.get(info.tag, 0.0))
            for info, speed in view.speeds.estimates(infos)]


def backlog_of(view: RouterView) -> tuple[float, ...]:
    """Each stream's expected remaining seconds, as the node's router keeps them (`Router.memory_view`)."""
    return tuple(sorted(left for _, left in remaining_by_stream(view)))


def report_of(view: RouterView, node: str) -> pb.NodeCapacity:
    """The node router's `WatchCapacity` report of `view`, built by the production code."""
    memory = MemorySnapshot("nvml", (GpuMemory(node, view.gpu_name, view.free_bytes, view.capacity_bytes),))
    candidates = node_candidates(view)
    streams = streams_of(view, {c.variant.tag: c.speed.decode_tps for c in candidates})
    return node_capacity(memory, OLLAMA_MINIMUM_MEMORY, {view.family.name: candidates}, {},
                         sum(view.in_flight.values()), backlog_of(view), True, MAX_IN_FLIGHT, streams,
                         offered_load(view.arrivals, view.now))


def _steady_key(view: RouterView) -> tuple[object, ...]:
    """Everything a report is built from except the backlog: equal keys make equal reports."""
    return (view.free_bytes, sorted(view.resident.items()), sorted((t, n) for t, n in view.in_flight.items() if n),
            view.speeds.stats)


class _Assigned:
    """The node router's side of a pinned request: it serves the variant the fleet named, and keeps its own
    estimate of the request's service time (its own `decide` for the pinned tag) for its backlog."""

    name = "fleet-assigned"

    def __init__(self) -> None:
        self.choices: dict[int, Choice] = {}

    def choose(self, request: Request, view: RouterView) -> Choice:
        return self.choices.pop(request.id)


@dataclass(slots=True)
class _Node:
    spec: NodeSpec
    sim: Simulation
    assigned: _Assigned
    sent: pb.NodeCapacity | None = None
    sent_key: tuple[object, ...] = ()
    sent_at: float = -math.inf
    state: NodeState | None = None
    polled_at: float = -math.inf
    sent_since: list[tuple[float, Sent]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FleetResult:
    """Every request's outcome (`merged`, for the report's figures) and each node's own run."""

    merged: RunResult
    nodes: Mapping[str, RunResult]
    reports: int


class FleetSimulation:
    """One trace across `nodes` under one dispatcher. `run()` returns the merged and per-node results."""

    def __init__(self, nodes: Sequence[NodeSpec], family: FamilySpec, requests: Sequence[Request],
                 dispatcher: Dispatcher, engine: EngineSpec = DEFAULT_ENGINE, num_ctx: int = NUM_CTX,
                 config: PolicyConfig | None = None) -> None:
        self.family, self.dispatcher, self.num_ctx = family, dispatcher, num_ctx
        self._requests = sorted(requests, key=lambda r: r.arrival)
        # The node routers' own policy settings (what they price a pinned request with).
        self._config = config or PolicyConfig(runner_parallel=engine.num_parallel)
        self._nodes: dict[str, _Node] = {}
        for spec in nodes:
            assigned = _Assigned()
            sim = Simulation(spec.gpu, family, (), spec.tenant, assigned, engine=engine, num_ctx=num_ctx)
            self._nodes[spec.name] = _Node(spec, sim, assigned)
        self._reports = 0

    def _poll(self, node: _Node, t: float) -> None:
        """The node's report at the poll tick before `t`, if its router would send one then: when
        `capacity.changed` says so (the report is built only when its inputs moved) or the interval is up."""
        tick = math.floor(t / CHANGE_POLL_S) * CHANGE_POLL_S
        if tick <= node.polled_at:
            return
        node.polled_at = tick
        node.sim.run_until(tick)
        view = node.sim.view()
        key = _steady_key(view)
        sent = node.sent
        due = sent is None or tick - node.sent_at >= REPORT_INTERVAL_S
        if sent is not None and not due and key == node.sent_key \
                and abs(sum(backlog_of(view)) - sent.backlog_seconds) < BACKLOG_STEP_S:
            return
        report = report_of(view, node.spec.name)
        if sent is None or due or changed(sent, report):
            node.sent, node.sent_key, node.sent_at, node.state = report, key, tick, read_report(report)
            node.sent_since = [(at, sent) for at, sent in node.sent_since if at > tick]
            self._reports += 1

    @staticmethod
    def _reported(node: _Node, t: float) -> NodeState:
        """The node's last report with what the fleet sent it since (each stream's time left as of `t`)."""
        assert node.state is not None
        return with_routed(node.state, [replace(sent, time_left=sent.time_left - (t - at))
                                        if sent.time_left is not None else sent for at, sent in node.sent_since])

    def _service_seconds(self, node: _Node, request: Request, tag: str) -> float:
        """The node router's own estimate for the pinned request (its `decide` for that tag, less the queue)."""
        view = node.sim.view()
        pinned = RoutingRequest(self.family.name, request.preference, pinned_tag=tag,
                                prompt_tokens=request.prompt_tokens, num_predict=request.output_tokens,
                                num_ctx=self.num_ctx)
        memory = MemoryView(view.free_bytes, OLLAMA_MINIMUM_MEMORY, "nvml")
        chosen = decide(pinned, node_candidates(view), memory, self._config).chosen
        return chosen.expected_seconds - chosen.queue_seconds if chosen else 0.0

    def run(self) -> FleetResult:
        refused: list[RequestResult] = []
        for request in self._requests:
            t = request.arrival
            if self.dispatcher.reads_reports:
                for node in self._nodes.values():
                    self._poll(node, t)
            for node in self._nodes.values():
                node.sim.run_until(t)
            view = FleetView(t, self.family, self.num_ctx,
                             {n: self._reported(node, t) for n, node in self._nodes.items() if node.state is not None},
                             {n: sum(node.sim.view().in_flight.values()) for n, node in self._nodes.items()},
                             {n: node.sim for n, node in self._nodes.items()})
            routed = self.dispatcher.route(request, view)
            if routed.node is None or routed.tag is None:
                refused.append(RequestResult(request, Outcome.REJECTED, routed.reason))
                continue
            node = self._nodes[routed.node]
            if routed.sent is not None:
                node.sent_since.append((t, routed.sent))
            node.assigned.choices[request.id] = Choice(routed.tag, routed.reason,
                                                       self._service_seconds(node, request, routed.tag))
            node.sim.submit(request)
            node.sim.run_until(t)
        runs = {}
        for name, node in self._nodes.items():
            node.sim.run_until(math.inf)
            runs[name] = node.sim.result()
        results = sorted([r for run in runs.values() for r in run.results] + refused, key=lambda r: r.request.id)
        merged = RunResult(tuple(results), sum(r.loads for r in runs.values()),
                           sum(r.evicting_loads for r in runs.values()), sum(r.partial_loads for r in runs.values()),
                           (), sum(r.capacity_bytes for r in runs.values()))
        return FleetResult(merged, runs, self._reports)
