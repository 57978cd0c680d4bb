"""The fleet router's count of the streams it sent a node since that node's last report (`FleetRouter._with_sent`),
through its own request path: a real `NodeSet` subscribed over gRPC to a stand-in node, and a clock the test
moves, so that "sent after the report" and "sent before it" are decided by the test, not by timing. And what a
repeated report keeps (the node's state, the catalog the router built from it) and a changed one replaces.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from quantrouter.errors import ModelNotFound
from quantrouter.fleet.metrics import FleetMetrics
from quantrouter.fleet.nodes import NodeSet, NodeSettings
from quantrouter.fleet.router import FleetRouter
from quantrouter.policy import PolicyConfig, RoutingRequest
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from quantrouter.values import Decision, Preference
from tests.support import ManualClock
from tests.unit.test_fleet_state import report

NODE = "n1"
FAMILY = "gemma3:270m"
REQUEST = RoutingRequest(FAMILY, Preference.QUALITY, num_predict=64, num_ctx=4096)
# Bounds a hang only: the report reaching the node set over a local socket.
REPORT_TIMEOUT_S = 30.0


class StandInNode(pb_grpc.RouterServiceServicer):  # type: ignore[misc]
    """A stand-in node router: it reports what the test puts in `reports`, and answers every Generate as a node
    router does first, with its own (pinned) decision, then holds it open until the caller leaves. It stands in
    for a node whose reports the test must time exactly; the fleet's side (the node set, its subscription, the
    router) is the real one."""

    def __init__(self) -> None:
        self.reports: asyncio.Queue[pb.NodeCapacity] = asyncio.Queue()

    async def WatchCapacity(self, request: pb.WatchCapacityRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.NodeCapacity]:
        while True:
            yield await self.reports.get()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        yield pb.GenerateResponse(decision=pb.RouteDecision(model=FAMILY, variant=request.model, pinned=True))
        await asyncio.Event().wait()  # streaming: the fleet's caller holds it until it leaves


def open_generate(stub: pb_grpc.RouterServiceStub, tag: str) -> Any:
    return stub.Generate(pb.GenerateRequest(model=tag))


def queue_seconds(router: FleetRouter) -> float:
    """The queue the fleet prices on the node's only variant: the report's, plus the streams it adds."""
    decision = router.decide(REQUEST)
    assert decision.chosen is not None and decision.node == NODE, decision.reason
    return decision.chosen.queue_seconds


async def report_arrives(nodes: NodeSet, stand_in: StandInNode, sequence: int,
                         message: pb.NodeCapacity | None = None) -> None:
    """`message` (default: `report()`) with this sequence number, sent by the node and accepted by the node set."""
    message = message if message is not None else report()
    message.sequence = sequence
    await stand_in.reports.put(message)
    async with asyncio.timeout(REPORT_TIMEOUT_S):
        while (node := nodes.get(NODE)) is None or node.report is None or node.report.sequence != sequence:
            await asyncio.sleep(0.01)


@dataclass
class Fleet:
    """A fleet router and its node set, subscribed to one stand-in node, on a clock the test moves."""

    stand_in: StandInNode
    clock: ManualClock
    nodes: NodeSet
    router: FleetRouter


@contextlib.asynccontextmanager
async def fleet_over_a_stand_in() -> AsyncIterator[Fleet]:
    stand_in, clock = StandInNode(), ManualClock(100.0)
    server = grpc.aio.server()
    pb_grpc.add_RouterServiceServicer_to_server(stand_in, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    nodes = NodeSet(NodeSettings(), clock=clock)
    try:
        nodes.update({NODE: f"127.0.0.1:{port}"})
        yield Fleet(stand_in, clock, nodes, FleetRouter(nodes, FleetMetrics(CollectorRegistry(), nodes),
                                                        PolicyConfig(), clock=clock))
    finally:
        await nodes.close()
        await server.stop(0)


async def sent(router: FleetRouter) -> AsyncIterator[Decision | Any]:
    """A stream forwarded to the node and still open (the node took the call, the fleet's decision was read)."""
    stream = router.stream(REQUEST, open_generate)
    assert isinstance(await anext(stream), Decision)
    return stream


async def test_a_stream_sent_after_the_nodes_last_report_is_counted_and_one_sent_before_it_is_not() -> None:
    async with fleet_over_a_stand_in() as fleet:
        nodes, stand_in, clock, router = fleet.nodes, fleet.stand_in, fleet.clock, fleet.router
        await report_arrives(nodes, stand_in, sequence=1)
        reported = queue_seconds(router)  # the report's own streams only

        clock.now += 1
        streams = [await sent(router)]  # after report 1: the node cannot have shown it yet
        one_more = queue_seconds(router)
        assert one_more > reported

        clock.now += 1
        await report_arrives(nodes, stand_in, sequence=2)  # a report that arrived after the stream was sent
        assert queue_seconds(router) == reported

        clock.now += 1
        streams.append(await sent(router))  # after report 2: counted again, the first one still not
        assert queue_seconds(router) == one_more

        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        assert queue_seconds(router) == reported  # an ended stream is no longer added


async def test_a_repeated_report_keeps_the_state_read_and_a_changed_one_is_read_and_resolved_anew() -> None:
    """A quiet node's periodic report is not read again (its state object stays, and what the router built from it,
    such as the node's catalog); a report that says something new replaces both."""
    async with fleet_over_a_stand_in() as fleet:
        nodes, stand_in, router = fleet.nodes, fleet.stand_in, fleet.router
        await report_arrives(nodes, stand_in, sequence=1)
        node = nodes.get(NODE)
        assert node is not None and node.state is not None
        first = node.state
        tag = first.candidates[0].variant.tag
        assert router.resolve(tag) == (FAMILY, tag)

        await report_arrives(nodes, stand_in, sequence=2)  # the same report again
        assert node.state is first and first.sequence == 1

        renamed = report()
        renamed.variants[0].variant.tag = f"{FAMILY}-renamed"
        await report_arrives(nodes, stand_in, sequence=3, message=renamed)
        assert node.state is not first and node.state.sequence == 3
        assert router.resolve(f"{FAMILY}-renamed") == (FAMILY, f"{FAMILY}-renamed")
        with pytest.raises(ModelNotFound):
            router.resolve(tag)  # the old catalog is not used again
