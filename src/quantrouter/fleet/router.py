"""The fleet's request path: decide the (node, variant), forward to that node's router with the variant
pinned, fall back to the next pair before the first token, relay the rest as it comes.

The node router does the generating (and its own metrics, throughput learning and Ollama fallbacks);
the fleet only chooses and relays. It forwards as soon as `fleet.choice.pick` has ranked the pair, and
explains the pair (every node's listing, the reason: `Pick.explain`) only when the node's own first message
(its pinned decision) comes in, which the fleet's decision replaces, naming the node. Built and sent before,
the decision competed for the CPU and the event loop with the node call the first token waits for (about
0.3 ms of the hop's p50 on two shared cores, in scratch runs comparing the two in the same rounds). A pair
that fails before taking the call (a draining node, say) is never announced: the caller sees the fallback's
decision, marked `fallback`.

Errors before the first token that say "this pair cannot serve now" (UNAVAILABLE, RESOURCE_EXHAUSTED,
NOT_FOUND, FAILED_PRECONDITION, INTERNAL, UNKNOWN) move on to the next pair, at most `MAX_ATTEMPTS` in all
(UNAVAILABLE and RESOURCE_EXHAUSTED speak for the whole node, so the next pair is on another node); any
other error is the caller's and is passed on as the node gave it. After the first token a failing node
ends the stream with UNAVAILABLE.

A node's report is up to a report interval old; the streams this router sent a node after its last report
was received are added to that report before each decision (`fleet.state.with_routed`), so that the
arrivals of a burst do not all queue on the runner the last report showed idle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc

from quantrouter.client import error_details
from quantrouter.errors import ModelNotFound, NodeAnswered, NodeFailed, NoLiveNode, reporting_status
from quantrouter.fleet.choice import Pick, pick
from quantrouter.fleet.metrics import FleetMetrics
from quantrouter.fleet.nodes import NodeSet
from quantrouter.fleet.state import NodeState, Routed, with_routed
from quantrouter.metrics import OTHER, children
from quantrouter.policy import PolicyConfig, RoutingRequest
from quantrouter.router import failure_of
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from quantrouter.values import Decision

__all__ = ["FleetRouter", "OpenCall"]

log = logging.getLogger(__name__)

# Pairs tried per request, the first included.
MAX_ATTEMPTS = 3
_FALLBACK_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
# Of those, the codes that speak for the whole node (its backend or router is down, full or draining):
# the request then leaves the node, rather than trying the node's next variant.
_NODE_WIDE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

# Opens the node's stream for a pinned tag: (stub, tag) → the call (its messages have an `event` oneof).
OpenCall = Callable[[pb_grpc.RouterServiceStub, str], Any]


def _relayed(node: str, error: grpc.aio.AioRpcError) -> NodeAnswered:
    details = error_details(error)
    return NodeAnswered(error.code(), details.reason, f"node {node}: {error.details()}",
                        retry_after=details.retry_after, metadata={"node": node})


class FleetRouter:
    def __init__(self, nodes: NodeSet, metrics: FleetMetrics, policy: PolicyConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nodes = nodes
        self.metrics = metrics
        self.policy = policy
        self._clock = clock
        self.in_flight = 0
        # Per node, the streams forwarded to it that its reports may not show yet: (sent at, the stream).
        self._sent: dict[str, list[tuple[float, Routed]]] = {}
        # Each request's series, looked up without `labels()`'s checks and lock (metrics.children).
        self._decided = children(metrics.decisions)
        self._finished = children(metrics.requests)
        self._first_token = children(metrics.time_to_first_token)

    def live(self) -> dict[str, NodeState]:
        """The live nodes, or UNAVAILABLE naming every node and why it is out."""
        live = self.nodes.live()
        if not live:
            down = self.nodes.down()
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(down.items())) or "none configured"
            raise NoLiveNode(f"no live node to route to ({why}); retry shortly",
                             retry_after=1.0, metadata={"nodes": ",".join(sorted(down))[:256]})
        return live

    def resolve(self, model: str) -> tuple[str, str | None]:
        live = self.live()
        for name in sorted(live):
            resolution = live[name].resolve(model)
            if resolution is not None:
                return resolution.family, resolution.pinned_tag
        known = sorted({f for state in live.values() for f in state.families})
        raise ModelNotFound(f"model {model!r} is not a family or tag on any live node; families: "
                            f"{', '.join(known) or 'none yet'}", metadata={"model": model[:64]})

    def decide(self, request: RoutingRequest, excluded: frozenset[tuple[str, str]] = frozenset()) -> Decision:
        return self._pick(request, excluded).explain()

    def _pick(self, request: RoutingRequest, excluded: frozenset[tuple[str, str]] = frozenset()) -> Pick:
        return pick(request, {name: self._with_sent(name, state) for name, state in self.live().items()},
                    self.policy, excluded)

    def _with_sent(self, name: str, state: NodeState) -> NodeState:
        """`state` with the streams sent to the node after its last report arrived (their time left as of now)."""
        target, now = self.nodes.get(name), self._clock()
        received = target.received_at if target is not None else now
        since = [(at, r) for at, r in self._sent.get(name, ()) if at > received]
        return with_routed(state, [replace(r, time_left=r.time_left - (now - at)) if r.time_left is not None else r
                                   for at, r in since])

    def _record(self, decision: Decision) -> None:
        """Counts the decision; a served one once the node's first message is in, so not before its call leaves."""
        chosen = decision.chosen
        self._decided(decision.node or OTHER, decision.family, chosen.tag if chosen else OTHER,
                      decision.preference.value, decision.reason_code).inc()

    async def stream(self, request: RoutingRequest, open_call: OpenCall,
                     announce: Callable[[Decision], Any] = lambda decision: decision) -> AsyncIterator[Any]:
        """The fleet's decision, as `announce` makes it a message, then the node's own messages (text chunks and
        completion) as they come."""
        started = self._clock()
        self.in_flight += 1
        node, tag = OTHER, OTHER

        def closed(code: grpc.StatusCode) -> None:
            self.in_flight -= 1
            self._finished(node, request.family, tag, code.name).inc()

        with reporting_status(closed):
            excluded: frozenset[tuple[str, str]] = frozenset()
            attempts = 0
            attempt = self._pick(request)
            while True:
                chosen = attempt.chosen
                if chosen is None:
                    decision = attempt.explain()
                    self._record(decision)
                    raise failure_of(decision)
                node, tag = chosen.node, chosen.tag
                announced = relayed = False
                call = self._open(node, tag, open_call)
                sent = (self._clock(), Routed(tag, chosen.expected_seconds - chosen.queue_seconds,
                                              chosen.tokens_per_second, request.time_remaining,
                                              request.min_tokens_per_second))
                self._sent.setdefault(node, []).append(sent)
                try:
                    async for message in call:
                        event = message.WhichOneof("event")
                        if not announced:  # the node has taken the call: now the fleet's decision goes out
                            announced = True
                            decision = attempt.explain()
                            self._record(decision)
                            yield announce(decision)
                        if event == "decision":  # the node's own, pinned: the fleet's replaces it
                            continue
                        if not relayed and event == "chunk":
                            relayed = True
                            first_token = self._clock() - started
                            yield message  # the first token leaves before its metric is observed
                            self._first_token(node, request.family, tag).observe(first_token)
                            continue
                        yield message
                    if not announced:  # a node that ended its stream with nothing: the call still had a decision
                        yield announce(attempt.explain())
                    return
                except grpc.aio.AioRpcError as error:
                    if relayed:
                        raise NodeFailed(f"node {node} failed after the first token: {error.code().name}: "
                                         f"{error.details()}", metadata={"node": node}) from None
                    attempts += 1
                    if error.code() not in _FALLBACK_CODES or attempts >= MAX_ATTEMPTS:
                        raise _relayed(node, error) from None
                    excluded |= self._failed(node, tag, request.family, error.code())
                    self._forget(node, sent)  # before the next decision, which should not count it
                    try:
                        alternative = self._pick(request, excluded)
                    except NoLiveNode:
                        raise _relayed(node, error) from None
                    if alternative.chosen is None:
                        raise _relayed(node, error) from None
                    log.warning("node %s could not serve %s before its first token (%s), falling back to %s on %s",
                                node, tag, error.code().name, alternative.chosen.tag, alternative.chosen.node)
                    self.metrics.fallbacks.labels(node, tag, error.code().name).inc()
                finally:
                    call.cancel()
                    self._forget(node, sent)
                    if not announced:  # counted all the same, once the node call is over
                        self._record(attempt.explain())
                attempt = alternative

    def _forget(self, node: str, sent: tuple[float, Routed]) -> None:
        """The stream ended or moved on: the node's reports no longer need it added."""
        streams = self._sent.get(node, [])
        if sent in streams:
            streams.remove(sent)

    def _failed(self, node: str, tag: str, family: str, code: grpc.StatusCode) -> frozenset[tuple[str, str]]:
        """The pairs to leave out after `tag` failed on `node`: the pair, or all of the node's family."""
        target = self.nodes.get(node)
        if code not in _NODE_WIDE_CODES or target is None or target.state is None:
            return frozenset({(node, tag)})
        return frozenset({(node, tag)} | {(node, c.variant.tag) for c in target.state.family(family)})

    def _open(self, node: str, tag: str, open_call: OpenCall) -> Any:
        """The node's call for `tag` (its request is written on the loop's next turn); the caller cancels it
        when it stops, however it stops."""
        target = self.nodes.get(node)
        if target is None:
            raise NoLiveNode(f"node {node} left the fleet")
        return open_call(target.stub, tag)
