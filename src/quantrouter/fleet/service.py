"""The fleet router's servicer: the same Generate / Chat / Route / ListVariants API as a node router.

Requests are validated by the node router's own `RequestReader` (one set of rules), decided over the
live nodes, and forwarded as they came with `model` set to the chosen tag (the variant pinned); the
caller's remaining deadline goes with them, and so does the fleet's `num_ctx` when the caller set none,
so the node loads the context the fleet priced. `ListVariants` merges the nodes' listings: a variant
appears once, resident when resident anywhere, with the figures of the node that measured it most;
memory is the fleet's sum, one device row per node GPU named `node/gpu`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from quantrouter.capacity import memory_status_pb, variant_pb
from quantrouter.errors import ShuttingDown
from quantrouter.fleet.router import FleetRouter, OpenCall
from quantrouter.listing import variant_row
from quantrouter.memory import GpuMemory, MemorySnapshot
from quantrouter.policy import CandidateInput, RoutingRequest
from quantrouter.quant import quality_key
from quantrouter.router import failure_of
from quantrouter.service import RequestReader, decision_pb
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from quantrouter.values import Decision

__all__ = ["FleetService"]

FLEET_SOURCE = "fleet"


def _generate_decision(decision: Decision) -> pb.GenerateResponse:
    return pb.GenerateResponse(decision=decision_pb(decision))


def _chat_decision(decision: Decision) -> pb.ChatResponse:
    return pb.ChatResponse(decision=decision_pb(decision))


class FleetService(pb_grpc.RouterServiceServicer):  # type: ignore[misc]
    def __init__(self, router: FleetRouter, reader: RequestReader, shutting_down: Callable[[], bool]) -> None:
        self._router = router
        self._reader = reader
        self._shutting_down = shutting_down

    def _forwarding(self, request: Any, routing: RoutingRequest, method: str,
                    context: grpc.aio.ServicerContext) -> OpenCall:
        """How the call to a node opens for `request`, read as `routing`: refused while the router shuts down."""
        if self._shutting_down():
            raise ShuttingDown("the fleet router is shutting down; retry on another replica")

        def open_call(stub: pb_grpc.RouterServiceStub, tag: str) -> Any:
            # The caller's request goes on as it came, pinned: read already, it is needed for nothing else (a copy
            # cost the path to the first token a copy of the prompt).
            request.model = tag
            # The context the fleet priced is the one the node loads, whatever the node's own default.
            request.options.num_ctx = routing.num_ctx
            return getattr(stub, method)(request, timeout=context.time_remaining(),
                                         metadata=self._router.nodes.metadata)

        return open_call

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        routing = self._reader.generate_routing(request, context.time_remaining())
        async for message in self._router.stream(routing, self._forwarding(request, routing, "Generate", context),
                                                 _generate_decision):
            yield message

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ChatResponse]:
        routing = self._reader.chat_routing(request, context.time_remaining())
        async for message in self._router.stream(routing, self._forwarding(request, routing, "Chat", context),
                                                 _chat_decision):
            yield message

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:
        decision = self._router.decide(self._reader.route(request, context.time_remaining()))
        if decision.chosen is None:
            raise failure_of(decision)
        return pb.RouteResponse(decision=decision_pb(decision))

    async def ListVariants(self, request: pb.ListVariantsRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListVariantsResponse:
        live = self._router.live()
        wanted = self._router.resolve(request.model)[0] if request.model else None
        best: dict[str, CandidateInput] = {}
        resident: set[str] = set()
        for state in live.values():
            for c in state.candidates:
                if wanted not in (None, c.variant.family):
                    continue
                if c.variant.resident:
                    resident.add(c.variant.tag)
                if c.variant.tag not in best or c.speed.samples > best[c.variant.tag].speed.samples:
                    best[c.variant.tag] = c
        families: dict[str, list[pb.Variant]] = {}
        for c in sorted(best.values(), key=lambda c: (quality_key(c.variant.quant), c.variant.tag)):
            listed = variant_pb(variant_row(c.variant, c.speed, (c.quality, c.quality_measured)))
            listed.resident = c.variant.tag in resident
            families.setdefault(c.variant.family, []).append(listed)
        gpus = tuple(GpuMemory(f"{name}/{g.uuid}", f"{name}/{g.name}", g.free_bytes, g.total_bytes)
                     for name, state in sorted(live.items()) for g in state.memory.gpus)
        memory = MemorySnapshot(FLEET_SOURCE, gpus, f"{len(live)} live nodes: {', '.join(sorted(live))}")
        return pb.ListVariantsResponse(families=[pb.Family(name=f, variants=v) for f, v in sorted(families.items())],
                                       memory=memory_status_pb(memory))
