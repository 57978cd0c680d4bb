"""The multi-node simulator (bench/sim/fleet.py): its bookkeeping, what the fleet is fed, and that its truth can
disagree with the fleet's choice."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from bench.sim.engine import Outcome, Simulation
from bench.sim.fleet import (
    DISPATCHERS,
    Dispatcher,
    FleetOracle,
    FleetSimulation,
    NodeSpec,
    QuantrouterFleet,
    RoundRobin,
    report_of,
    routing_request,
)
from bench.sim.hardware import GB, H100, LLAMA_8B, OLLAMA_MINIMUM_MEMORY, RTX_4090
from bench.sim.policies import QuantRouter, goodput, streams_of
from bench.sim.workload import Phase, Request, TenantProfile, generate_requests, generate_tenant, interactive_mix

from quantrouter.fleet.state import read_report
from quantrouter.policy import PolicyConfig, decide, offered_load
from quantrouter.values import Preference

DURATION = 90.0
QUIET = TenantProfile(int(GB), 3 * int(GB), (30.0, 60.0))
SHARED = TenantProfile(60 * int(GB), 76 * int(GB), (10.0, 30.0))


def fleet_trace(seed: int, rate: float = 1.0) -> tuple[tuple[Request, ...], tuple[NodeSpec, ...]]:
    """A busy 4090 + two H100s, one of them shared with a tenant holding 60–76 GB."""
    rng = random.Random(seed)
    requests = generate_requests(interactive_mix(1, 1), (Phase(0, rate),), DURATION, rng)
    nodes = (NodeSpec("rtx4090", RTX_4090, generate_tenant(QUIET, DURATION, rng)),
             NodeSpec("h100-a", H100, generate_tenant(QUIET, DURATION, rng)),
             NodeSpec("h100-b", H100, generate_tenant(SHARED, DURATION, rng)))
    return requests, nodes


@pytest.mark.parametrize("dispatcher", DISPATCHERS, ids=lambda d: d.name)
def test_every_request_ends_once_on_one_node_or_refused_and_no_gpu_holds_more_than_it_has(
        dispatcher: Dispatcher) -> None:
    requests, nodes = fleet_trace(3)
    result = FleetSimulation(nodes, LLAMA_8B, requests, dispatcher).run()
    assert [r.request.id for r in result.merged.results] == [r.id for r in requests]
    per_node = [{r.request.id for r in run.results} for run in result.nodes.values()]
    assert sum(len(ids) for ids in per_node) == len(set().union(*per_node))  # no request on two nodes
    refused = {r.request.id for r in result.merged.results} - set().union(*per_node)
    assert all(r.outcome is Outcome.REJECTED for r in result.merged.results if r.request.id in refused)
    assert sum(len(ids) for ids in per_node) > len(requests) // 2  # most were routed, to more than one node
    assert sum(bool(ids) for ids in per_node) >= 2
    assert result.merged.loads == sum(run.loads for run in result.nodes.values())
    for spec in nodes:
        memory = result.nodes[spec.name].memory
        assert memory and all(m.tenant_bytes >= 0 and m.tenant_bytes + m.runner_bytes <= spec.gpu.capacity_bytes
                              for m in memory)


def test_the_fleet_reads_reports_and_the_baselines_do_not() -> None:
    requests, nodes = fleet_trace(4)
    ours = FleetSimulation(nodes, LLAMA_8B, requests, QuantrouterFleet()).run()
    # Reported on change (and every report interval), not once per arrival and node.
    assert 0 < ours.reports < len(requests) * len(nodes)
    assert FleetSimulation(nodes, LLAMA_8B, requests, RoundRobin()).run().reports == 0


def test_a_node_report_read_back_prices_a_request_exactly_as_the_node_router_does() -> None:
    """Mid-trace, with streams in flight: the single-node simulator's quantrouter (fed as the router feeds
    `decide`) and `decide` over the node's WatchCapacity report, read back as the fleet reads it, agree."""
    requests = generate_requests(interactive_mix(1, 1), (Phase(0, 1.5),), 60.0, random.Random(5))
    sim = Simulation(H100, LLAMA_8B, requests[:-1], ((0.0, 2 * int(GB)),), QuantRouter())
    last = requests[-1]
    sim.run_until(last.arrival)
    view = sim.view()
    assert view.backlog and view.resident  # a node with work to price around
    state = read_report(report_of(view, "h100"))
    assert state.backlog and state.memory_view.reserve_bytes == OLLAMA_MINIMUM_MEMORY
    # The streams' SLOs and the offered load travel too: the node's guard and overload rule price with them.
    speeds = {c.variant.tag: c.speed.decode_tps for c in state.family(LLAMA_8B.name)}
    assert any(f.time_left is not None for f in state.streams)
    assert state.memory_view.in_flight == streams_of(view, speeds)
    assert state.memory_view.offered_load > 0
    assert state.memory_view.offered_load == pytest.approx(offered_load(view.arrivals, view.now))
    assert state.memory_view.shared
    for preference in Preference:
        request = replace(last, preference=preference)
        own = QuantRouter().choose(request, view)
        from_report = decide(routing_request(request, LLAMA_8B, view.num_ctx), state.family(LLAMA_8B.name),
                             state.memory_view, PolicyConfig()).chosen
        assert from_report is not None and own.tag == from_report.tag
        assert own.service_seconds == pytest.approx(from_report.expected_seconds - from_report.queue_seconds)


def test_the_truth_can_disagree_with_the_fleets_choice() -> None:
    """A throttled H100 (a tenth of its bandwidth, e.g. a power-capped or shared card) reports the same NVML
    name, so the fleet's speed prior takes it for a full H100 until it has measured it. One long QUALITY
    request: the fleet puts F16 there and misses the deadline; the oracle, which knows the true speed, serves
    it on the 4090 in time, and so does round-robin's Q4_K_M on the throttled card."""
    throttled = replace(H100, name="H100 throttled", bandwidth=H100.bandwidth / 10)
    nodes = (NodeSpec("h100", throttled, ((0.0, 2 * int(GB)),)), NodeSpec("rtx4090", RTX_4090, ((0.0, 2 * int(GB)),)))
    request = Request(0, 1.0, Preference.QUALITY, 500, 800, 30.0, 0.0, 1.0)
    results = {d.name: FleetSimulation(nodes, LLAMA_8B, (request,), d).run() for d in DISPATCHERS}
    ours, oracle = results[QuantrouterFleet().name], results[FleetOracle().name]
    robin = results[RoundRobin().name]
    assert ours.nodes["h100"].results[0].tag == f"{LLAMA_8B.name}-f16"
    assert ours.merged.results[0].outcome is Outcome.DEADLINE and goodput(ours.merged) == 0
    assert oracle.nodes["rtx4090"].results and goodput(oracle.merged) > 0
    assert robin.nodes["h100"].results and goodput(robin.merged) > goodput(ours.merged)


def test_the_fleet_counts_what_it_sent_since_a_nodes_last_report() -> None:
    """Two LATENCY requests 50 ms apart, within one poll period, on two idle H100s: both read the same reports,
    but the second is priced with the first booked on its node (as `FleetRouter` books its own forwarded
    streams), so it goes to the other node instead of queueing behind the first."""
    nodes = tuple(NodeSpec(name, H100, ((0.0, 2 * int(GB)),)) for name in ("h100-a", "h100-b"))
    requests = [Request(i, 5.0 + 0.05 * i, Preference.LATENCY, 300, 150, 4.0, 0.0, 1.0) for i in range(2)]
    result = FleetSimulation(nodes, LLAMA_8B, requests, QuantrouterFleet()).run()
    assert result.reports == len(nodes)  # one report each: the second request saw no newer one
    assert {name: [r.request.id for r in run.results] for name, run in result.nodes.items()} == {
        "h100-a": [0], "h100-b": [1]}
