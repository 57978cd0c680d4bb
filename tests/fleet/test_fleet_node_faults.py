"""Faults on real processes: a node router killed mid-stream and brought back, a node whose backend dies
under it, a node router draining, and a fleet router restarted under load.

The requests ask for QUALITY. Only the first of the two nodes fits F16, so it is the fleet's certain pick while
it is live, and the second serves a quantized variant when it is not: two nodes that could both hold F16 nearly
tied, and a report arriving between two requests could flip which one the second request went to.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from quantrouter.background import service_in_thread
from quantrouter.client import Options, RouterClient, error_details
from quantrouter.embedded import EmbeddedConfig, EmbeddedServer, run_embedded_in_thread
from quantrouter.fleet.server import FleetServer, fleet_in_thread
from quantrouter.server import START_TIMEOUT_S, RunningServer, start
from quantrouter.values import Completion, Decision
from tests.fleet.conftest import BUDGETS, NUM_CTX, Node, fleet_settings, node_settings, wait_for
from tests.support import FAMILY

PROMPT = "The capital of France is"
TWO = Options(num_predict=2, temperature=0.0, seed=1, num_ctx=NUM_CTX)
# Greedy, F16 continues PROMPT for 300 tokens and more without an end of turn (measured): the node is still
# generating when it is killed, whatever the machine's speed (a kill cancels its streams at once, no drain).
LONG = Options(num_predict=2000, temperature=0.0, seed=1, num_ctx=NUM_CTX)
CLEAN_ENDINGS = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
# The first fits F16 (QUALITY's pick), the second only the quantized variants up to Q5_K_M.
NAMES = ("east", "west")
NODE_BUDGETS = {"east": BUDGETS["large"], "west": BUDGETS["small"]}


class KillableNode:
    """A node of its own (an embedded backend and a node router) that a test may kill and start again on the
    same port. Its router refreshes its catalog rarely, so after its backend
    dies it goes on reporting it as up (as a node does until its next probe) and the fleet forwards to it."""

    def __init__(self, backend: EmbeddedServer, backend_stack: contextlib.ExitStack) -> None:
        self.backend = backend
        self.backend_stack = backend_stack
        self.port = 0
        self.running: RunningServer | None = None
        self._router: contextlib.ExitStack | None = None

    def start(self) -> None:
        stack = contextlib.ExitStack()
        settings = node_settings(self.backend, grpc_address=f"127.0.0.1:{self.port}", ps_refresh_interval=60.0,
                                 tags_refresh_interval=60.0)
        # Stopped with no grace: a node that dies does not drain its streams (a 1 s drain let a fast machine
        # finish the answer first, and the stream then ended cleanly instead of failing over).
        self.running = stack.enter_context(service_in_thread(lambda: start(settings, CollectorRegistry()),
                                                             lambda running: running.stop(grace=0.0),
                                                             name="killable-node", start_timeout=START_TIMEOUT_S))
        self.port, self._router = self.running.port, stack

    def kill(self) -> None:
        if self._router is not None:
            self._router.close()
            self._router, self.running = None, None


@pytest.fixture(scope="module")
def killable(cache_dir: Path, nodes: dict[str, Node]) -> Iterator[dict[str, KillableNode]]:
    started: dict[str, KillableNode] = {}
    try:
        for name in NAMES:
            stack = contextlib.ExitStack()
            backend = stack.enter_context(run_embedded_in_thread(EmbeddedConfig(
                cache_dir=cache_dir, memory_budget_bytes=NODE_BUDGETS[name])))
            started[name] = KillableNode(backend, stack)
            started[name].start()
        yield started
    finally:
        for node in started.values():
            node.kill()
            node.backend_stack.close()


def fallbacks(fleet: FleetServer, node: str, tag: str) -> float:
    """The fleet's count of UNAVAILABLE fallbacks away from (node, tag) so far (the module's tests share one fleet)."""
    return fleet.registry.get_sample_value("quantrouter_fleet_fallbacks_total", {
        "node": node, "target_model_name": tag, "code": "UNAVAILABLE"}) or 0.0


@pytest.fixture(scope="module")
def fault_fleet(killable: dict[str, KillableNode]) -> Iterator[FleetServer]:
    settings = fleet_settings({name: f"127.0.0.1:{node.port}" for name, node in killable.items()})
    with fleet_in_thread(settings, CollectorRegistry()) as running:
        wait_for(lambda: len(running.router.nodes.live()) == len(killable), what="both nodes' first reports")
        yield running


def test_a_node_killed_mid_stream_ends_it_cleanly_and_is_used_again_once_back(
        killable: dict[str, KillableNode], fault_fleet: FleetServer) -> None:
    live = fault_fleet.router.nodes.live
    with RouterClient(f"127.0.0.1:{fault_fleet.port}") as client:
        stream = client.generate(FAMILY, PROMPT, preference="quality", options=LONG)
        decision = next(stream)
        assert isinstance(decision, Decision) and decision.node == NAMES[0], decision
        victim, other = NAMES
        assert isinstance(next(stream), str)  # the first token has been relayed
        killable[victim].kill()
        with pytest.raises(grpc.RpcError) as raised:
            for _ in stream:
                pass
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE, raised.value
        assert error_details(raised.value).reason == "NODE_FAILED"
        assert victim in raised.value.details()

        wait_for(lambda: victim not in live(), what=f"the fleet to drop {victim}")
        assert client.route(FAMILY, preference="quality", options=TWO).node == other

        killable[victim].start()  # on the same port
        wait_for(lambda: victim in live(), what=f"{victim} to report again")
        killable[other].kill()  # now only the node that came back can serve
        wait_for(lambda: other not in live(), what=f"the fleet to drop {other}")
        events = list(client.generate(FAMILY, PROMPT, preference="quality", options=TWO))
        killable[other].start()
        wait_for(lambda: len(live()) == len(NAMES), what=f"{other} to report again")
    assert isinstance(events[0], Decision) and events[0].node == victim
    assert isinstance(events[-1], Completion) and events[-1].generated_tokens > 0


def by_pair(fleet: FleetServer, sample: str) -> Counter[tuple[str, str]]:
    """The fleet's `sample` series summed per (node, variant)."""
    return Counter({(s.labels["node"], s.labels["target_model_name"]): s.value
                    for m in fleet.registry.collect() for s in m.samples if s.name == sample})


DECIDED, FIRST_TOKENS = "quantrouter_fleet_route_decisions_total", "quantrouter_fleet_time_to_first_token_seconds_count"


def test_a_draining_node_that_refuses_the_call_is_fallen_back_from_and_its_pair_never_announced(
        killable: dict[str, KillableNode], fault_fleet: FleetServer) -> None:
    """A node router that drains (a rolling update) reports as before but refuses new calls with UNAVAILABLE
    before any message: the fleet moves to the other node, and since its decision goes out only once a node
    has taken the call, the caller sees one decision, the fallback's. The drain is the node's own flag, set
    on its running server without waiting out a real shutdown: a fault injected on purpose."""
    with RouterClient(f"127.0.0.1:{fault_fleet.port}") as client:
        first = client.route(FAMILY, preference="quality", options=TWO)
        assert first.node == NAMES[0] and first.chosen is not None, first.reason
        before = fallbacks(fault_fleet, first.node, first.chosen.tag)
        decided, first_tokens = by_pair(fault_fleet, DECIDED), by_pair(fault_fleet, FIRST_TOKENS)
        node = killable[first.node].running
        assert node is not None
        node.draining = True
        try:
            events = list(client.generate(FAMILY, PROMPT, preference="quality", options=TWO))
        finally:
            node.draining = False
    decisions = [e for e in events if isinstance(e, Decision)]
    assert [(d.node, d.fallback) for d in decisions] == [(NAMES[1], True)], [d.reason for d in decisions]
    assert isinstance(events[-1], Completion) and events[-1].generated_tokens > 0
    assert fallbacks(fault_fleet, first.node, first.chosen.tag) == before + 1
    # Both decisions are counted once, the refused one too (counted once its call is over, never announced);
    # the first token's metric is observed once it has left, for the pair that served it only.
    assert decisions[0].chosen is not None
    served = (decisions[0].node, decisions[0].chosen.tag)
    decided.subtract(by_pair(fault_fleet, DECIDED))
    first_tokens.subtract(by_pair(fault_fleet, FIRST_TOKENS))
    assert {pair: -n for pair, n in decided.items() if n} == {(first.node, first.chosen.tag): 1, served: 1}
    assert {pair: -n for pair, n in first_tokens.items() if n} == {served: 1}


def test_a_node_whose_backend_died_is_fallen_back_from_before_the_first_token(
        killable: dict[str, KillableNode], fault_fleet: FleetServer) -> None:
    with RouterClient(f"127.0.0.1:{fault_fleet.port}") as client:
        first = client.route(FAMILY, preference="quality", options=TWO)
        assert first.node == NAMES[0] and first.chosen is not None, first.reason
        before = fallbacks(fault_fleet, first.node, first.chosen.tag)
        killable[first.node].backend_stack.close()  # the node's Ollama is gone; its router has not noticed
        # Stopping llama.cpp may hold the interpreter long enough for the node's reports to lapse: wait
        # until it reports again (its backend still up, as far as it knows).
        wait_for(lambda: first.node in fault_fleet.router.nodes.live(), what=f"{first.node} to report again")
        assert client.route(FAMILY, preference="quality", options=TWO).node == first.node
        events = list(client.generate(FAMILY, PROMPT, preference="quality", options=TWO))
    decisions = [e for e in events if isinstance(e, Decision)]
    assert [d.node for d in decisions] == list(NAMES), [d.reason for d in decisions]
    assert decisions[1].fallback and not decisions[0].fallback
    assert isinstance(events[-1], Completion) and events[-1].generated_tokens > 0
    assert fallbacks(fault_fleet, first.node, first.chosen.tag) == before + 1


def test_a_fleet_router_restarted_under_load_ends_every_accepted_call_cleanly(nodes: dict[str, Node]) -> None:
    settings = fleet_settings({name: node.address for name, node in nodes.items()})
    endings: list[tuple[grpc.StatusCode, str]] = []
    accepted = threading.Semaphore(0)

    def call(target: str) -> None:
        with RouterClient(target) as client:
            try:
                for event in client.generate(FAMILY, PROMPT, preference="quality",
                                             options=Options(num_predict=48, num_ctx=NUM_CTX), timeout=120):
                    if isinstance(event, Decision):
                        accepted.release()
                endings.append((grpc.StatusCode.OK, ""))
            except grpc.RpcError as error:
                endings.append((error.code(), error.details() or ""))

    with fleet_in_thread(settings, CollectorRegistry()) as running:
        wait_for(lambda: len(running.router.nodes.live()) == len(nodes), what="every node's first report")
        callers = [threading.Thread(target=call, args=(f"127.0.0.1:{running.port}",)) for _ in range(4)]
        for caller in callers:
            caller.start()
        for _ in callers:
            assert accepted.acquire(timeout=60), "a call was never accepted"
    # The fleet router is stopped (1 s grace): every call has ended, none hangs, none with a muddled status.
    for caller in callers:
        caller.join(timeout=60)
        assert not caller.is_alive()
    assert len(endings) == 4
    assert all(code in CLEAN_ENDINGS and (code is grpc.StatusCode.OK or details) for code, details in endings), endings
    # Nothing leaked on the nodes: the fleet's cancelled calls cancelled the node streams.
    wait_for(lambda: all(node.router.router.in_flight == 0 for node in nodes.values()), timeout=30,
             what="the nodes' streams to end")
    with fleet_in_thread(settings, CollectorRegistry()) as restarted, \
            RouterClient(f"127.0.0.1:{restarted.port}") as client:
        wait_for(lambda: len(restarted.router.nodes.live()) == len(nodes), what="the restarted router's reports")
        events = list(client.generate(FAMILY, PROMPT, preference="quality", options=TWO))
    assert isinstance(events[-1], Completion)
