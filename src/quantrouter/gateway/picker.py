"""The picker's choice for one HTTP request: the (node, variant) from the fleet's own `choose`, the model
server endpoints to send it to (the chosen node first, then the next-best nodes for the same variant, as
Envoy's fallbacks), or the HTTP refusal that says why not.

Requests through a Gateway reach the model servers directly, so their node routers never count them:
the picker adds the streams it has sent to each node and not yet seen end to that node's reported
in-flight count before deciding, which keeps per-node limits and backlog honest. A node whose every
offer is blocked by its stream limit, or a picker at its own limit, sheds the request (429); a request
nothing can serve (memory, constraints, no live node) is refused with 503.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from http import HTTPStatus

import grpc

from quantrouter.errors import QuantrouterError
from quantrouter.fleet.choice import choose
from quantrouter.fleet.router import FleetRouter
from quantrouter.fleet.state import NodeState
from quantrouter.gateway.inference import HttpRefusal, InferenceCall
from quantrouter.router import failure_of
from quantrouter.service import RequestReader
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.values import Decision

__all__ = ["Pick", "Picker", "http_refusal"]

# Seconds a shed caller is told to wait (Retry-After) before trying again.
SHED_RETRY_AFTER_S = 1.0
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (HTTPStatus.BAD_REQUEST, "bad_request"),
    grpc.StatusCode.NOT_FOUND: (HTTPStatus.NOT_FOUND, "unknown_model"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (HTTPStatus.SERVICE_UNAVAILABLE, "no_variant_fits"),
    grpc.StatusCode.FAILED_PRECONDITION: (HTTPStatus.SERVICE_UNAVAILABLE, "constraints"),
    grpc.StatusCode.UNAVAILABLE: (HTTPStatus.SERVICE_UNAVAILABLE, "no_live_node"),
}


def http_refusal(error: QuantrouterError) -> HttpRefusal:
    """Our error as the HTTP answer a Gateway client gets (the gRPC status mapped as grpc-gateway maps it)."""
    status, reason = _HTTP_STATUS.get(error.code, (HTTPStatus.INTERNAL_SERVER_ERROR, "internal"))
    return HttpRefusal(status, reason, error.message, error.retry_after)


@dataclass(frozen=True, slots=True)
class Pick:
    decision: Decision
    node: str
    tag: str
    endpoints: tuple[str, ...]


class Picker:
    def __init__(self, router: FleetRouter, reader: RequestReader, endpoint_of: Callable[[str], str],
                 max_in_flight: int, fallbacks: int) -> None:
        self._router = router
        self._reader = reader
        self._endpoint_of = endpoint_of
        self._max_in_flight = max_in_flight
        self._fallbacks = fallbacks
        self.outstanding: Counter[str] = Counter()

    @property
    def in_flight(self) -> int:
        return sum(self.outstanding.values())

    def endpoint(self, node: str) -> str:
        return self._endpoint_of(node)

    def node_at(self, endpoint: str) -> str | None:
        return next((name for name in self._router.nodes.nodes if self._endpoint_of(name) == endpoint), None)

    def live_nodes(self, subset: frozenset[str] | None) -> dict[str, NodeState]:
        """The live nodes (within `subset`), each with the streams this picker sent it added to its load."""
        live = self._router.live()
        if subset is not None:
            live = {name: state for name, state in live.items() if self._endpoint_of(name) in subset}
            if not live:
                raise HttpRefusal(HTTPStatus.SERVICE_UNAVAILABLE, "subset",
                                  f"none of the endpoints the gateway allows ({', '.join(sorted(subset)) or 'none'}) "
                                  "is a live node")
        return {name: replace(state, in_flight=state.in_flight + self.outstanding[name])
                for name, state in live.items()}

    def pick(self, call: InferenceCall, subset: frozenset[str] | None) -> Pick:
        """The pick for `call` among the live nodes (within `subset` when the gateway gives one)."""
        if self.in_flight >= self._max_in_flight:
            raise HttpRefusal(HTTPStatus.TOO_MANY_REQUESTS, "shed",
                              f"the picker has {self.in_flight} streams in flight, its limit; retry shortly",
                              SHED_RETRY_AFTER_S)
        try:
            states = self.live_nodes(subset)
            if isinstance(call.request, pb.ChatRequest):
                routing, _ = self._reader.chat(call.request, None)
            else:
                routing, _ = self._reader.generate(call.request, None)
            decision = choose(routing, states, self._router.policy)
            if decision.chosen is None:
                if all(s.at_limit for s in states.values()):
                    raise HttpRefusal(HTTPStatus.TOO_MANY_REQUESTS, "shed",
                                      f"every node is at its stream limit ({decision.reason}); retry shortly",
                                      SHED_RETRY_AFTER_S)
                raise failure_of(decision)
        except QuantrouterError as error:
            raise http_refusal(error) from None
        tag = decision.chosen.tag
        order = [decision.node]
        pinned = replace(routing, pinned_tag=tag)
        while len(order) <= self._fallbacks:
            rest = {name: state for name, state in states.items() if name not in order}
            following = choose(pinned, rest, self._router.policy) if rest else None
            if following is None or following.chosen is None:
                break
            order.append(following.node)
        self.outstanding[decision.node] += 1
        return Pick(decision, decision.node, tag, tuple(self._endpoint_of(name) for name in order))

    def release(self, node: str) -> None:
        """A stream sent to `node` has ended."""
        self.outstanding[node] -= 1
        if self.outstanding[node] <= 0:
            del self.outstanding[node]

    def move(self, picked: str, served: str) -> None:
        """Envoy served the stream on a fallback node rather than the picked one."""
        self.release(picked)
        self.outstanding[served] += 1

