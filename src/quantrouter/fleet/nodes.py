"""The fleet's nodes: one `WatchCapacity` subscription per node, and which nodes are live right now.

A node is live while its last report was accepted, its backend is up, and that report is younger
than `stale_after`. Otherwise it is left out of routing and `why_not` says why, in words a person
can act on ("no report for 9.1 s", "report rejected: …", "unreachable: …"). A subscription that
breaks is opened again after `RECONNECT_S`, so a node that comes back is used again as soon as it
reports. The set of nodes can change at run time (discovery): `update` starts and stops
subscriptions and keeps the channels of nodes that stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2

from quantrouter.client import ChannelOption, async_channel
from quantrouter.fleet.state import NodeState, ReportRejected, read_report, same_report
from quantrouter.units import format_bytes
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc

__all__ = ["Node", "NodeSet", "NodeSettings"]

log = logging.getLogger(__name__)

# Wait this long before opening a broken subscription again.
RECONNECT_S = 0.5
# The forwarded calls' channel leaves retrying to the fleet router, which falls back to the next (node, variant)
# on UNAVAILABLE before the first token, a call that never left the fleet included: gRPC's own retry machinery
# (which would retry such a call transparently) cost each call's start about 13 µs on the path to the first token
# (scratch, paired calls on one machine).
_FORWARDING_OPTIONS = (("grpc.enable_retries", 0),)


@dataclass(frozen=True, slots=True)
class NodeSettings:
    # Ask each node for a report at least this often.
    report_interval: float = 1.0
    # Leave a node out of routing when its last accepted report is older than this.
    stale_after: float = 5.0
    # gRPC channel options for the node connections (message size limits).
    channel_options: tuple[ChannelOption, ...] = ()
    # Sent on every call to a node: its bearer token, when the node routers require one.
    metadata: tuple[tuple[str, str], ...] = ()
    # TLS to the nodes (None: plaintext).
    credentials: grpc.ChannelCredentials | None = None


@dataclass
class Node:
    """One node router as the fleet sees it; mutated only by its own subscription task."""

    name: str
    address: str
    channel: grpc.aio.Channel  # the requests the fleet forwards
    stub: pb_grpc.RouterServiceStub
    # The report subscription's own connection (`_report_channel`).
    report_channel: grpc.aio.Channel
    state: NodeState | None = None
    # The last accepted report: `state` was read from it, or from an earlier one that said the same but for its
    # sequence number (`state.sequence` is that one's).
    report: pb.NodeCapacity | None = field(default=None, repr=False)
    received_at: float = -math.inf
    problem: str = "no report yet"
    rejected: bool = False
    connected: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class NodeSet:
    def __init__(self, settings: NodeSettings, on_rejected: Callable[[str, str], None] = lambda node, reason: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._on_rejected = on_rejected
        self._clock = clock
        self._nodes: dict[str, Node] = {}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._settings.metadata

    @property
    def nodes(self) -> dict[str, Node]:
        return dict(self._nodes)

    def get(self, name: str) -> Node | None:
        """One node, without copying the set (the request path asks once per attempt)."""
        return self._nodes.get(name)

    def update(self, addresses: Mapping[str, str]) -> None:
        """Watch exactly these nodes (name → host:port): new ones are subscribed, gone ones dropped."""
        for name in list(self._nodes):
            if name not in addresses or self._nodes[name].address != addresses[name]:
                self._drop(name)
        for name, address in addresses.items():
            if name not in self._nodes:
                channel = async_channel(address, self._settings.credentials,
                                        (*self._settings.channel_options, *_FORWARDING_OPTIONS))
                node = Node(name, address, channel, pb_grpc.RouterServiceStub(channel), self._report_channel(address))
                node.task = asyncio.create_task(self._follow(node), name=f"watch-{name}")
                self._nodes[name] = node
                log.info("watching node %s at %s", name, address)

    def _report_channel(self, address: str) -> grpc.aio.Channel:
        """A channel of its own for a node's report stream, on a connection of its own (a local subchannel pool:
        gRPC otherwise shares one connection between channels of equal settings). On the connection that carried
        the open report stream, starting each forwarded call took about 1 ms of the fleet's CPU (py-spy over 120
        requests: 166 samples at 1 kHz in `initiate_unary_stream`, against 24 in the bare relay and 21 with the
        stream moved off): time the first token waits for."""
        return async_channel(address, self._settings.credentials,
                             (*self._settings.channel_options, ("grpc.use_local_subchannel_pool", 1)))

    def _drop(self, name: str) -> None:
        node = self._nodes.pop(name)
        if node.task is not None:
            node.task.cancel()
        asyncio.get_running_loop().create_task(_close(node))
        log.info("no longer watching node %s at %s", name, node.address)

    def age(self, node: Node) -> float:
        return self._clock() - node.received_at

    def why_not(self, node: Node) -> str:
        """Empty when the node is live; otherwise why it is left out."""
        if node.state is None or node.rejected or not node.connected:
            return node.problem
        if not node.state.backend_up:
            return "its backend (Ollama) is down"
        age = self.age(node)
        if age > self._settings.stale_after:
            return f"stale: no report for {age:.1f} s (limit {self._settings.stale_after:g} s)"
        return ""

    def live(self) -> dict[str, NodeState]:
        return {name: node.state for name, node in self._nodes.items()
                if node.state is not None and not self.why_not(node)}

    def down(self) -> dict[str, str]:
        """Every node left out of routing, with why."""
        return {name: why for name, node in self._nodes.items() if (why := self.why_not(node))}

    async def _follow(self, node: Node) -> None:
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(self._settings.report_interval * 1e9))
        while True:
            call = pb_grpc.RouterServiceStub(node.report_channel).WatchCapacity(
                pb.WatchCapacityRequest(interval=interval), metadata=self._settings.metadata)
            try:
                async for report in call:
                    node.connected = True
                    self._accept(node, report)
                problem = "the node ended its report stream"
            except grpc.aio.AioRpcError as error:
                problem = f"unreachable: {error.code().name}: {error.details()}"
            finally:
                call.cancel()
            if node.connected:
                log.warning("node %s left routing: %s", node.name, problem)
            node.connected, node.problem = False, problem
            await asyncio.sleep(RECONNECT_S)

    def _accept(self, node: Node, report: pb.NodeCapacity) -> None:
        if node.state is not None and node.report is not None and not node.rejected \
                and same_report(node.report, report):  # a quiet node's periodic report: nothing to read again
            # The state is kept as it is, not copied with the new sequence number: a copy rebuilt its lookups
            # (`NodeState.__post_init__`) on every report of every node (3 of 17 Python samples of an idle fleet in
            # 20 s, py-spy).
            node.report = report
            node.received_at, node.problem = self._clock(), ""
            return
        try:
            state = read_report(report)
        except ReportRejected as error:
            if not node.rejected:
                log.warning("node %s reported nonsense, marking it unhealthy: %s", node.name, error)
            node.rejected, node.problem = True, f"report rejected: {error}"
            self._on_rejected(node.name, error.reason)
            return
        if node.rejected or node.state is None:
            log.info("node %s reports: %d variants, %s free (%s)", node.name, len(state.candidates),
                     format_bytes(state.memory.free_bytes), state.memory.source)
        node.state, node.report, node.received_at, node.problem, node.rejected = state, report, self._clock(), "", False

    async def close(self) -> None:
        for node in self._nodes.values():
            if node.task is not None:
                node.task.cancel()
        tasks = [n.task for n in self._nodes.values() if n.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        for node in self._nodes.values():
            with contextlib.suppress(Exception):
                await _close(node)
        self._nodes.clear()


async def _close(node: Node) -> None:
    await node.channel.close()
    await node.report_channel.close()
