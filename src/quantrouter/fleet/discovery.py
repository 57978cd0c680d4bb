"""Nodes from Kubernetes: the ready endpoints of a headless Service, followed through its EndpointSlices.

`k8s://NAMESPACE/SERVICE[:PORT]` lists the Service's EndpointSlices (label
`kubernetes.io/service-name`), then watches them from the list's resourceVersion, through lightkube
(the `k8s` extra). Each ready endpoint becomes a node named after its pod (`targetRef`), at its
address and the port named `grpc` (or the only port, or PORT). Any error (API server unreachable,
RBAC, a watch that expired) keeps the last good node set, says so in a log line and a metric, and
starts over with a fresh list after `RETRY_S`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ServiceRef", "endpoints_of", "follow_service", "parse_target"]

log = logging.getLogger(__name__)

# The label Kubernetes puts on every EndpointSlice of a Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# The EndpointSlice port picked when the target names none.
GRPC_PORT_NAME = "grpc"
RETRY_S = 2.0

_TARGET = re.compile(r"^k8s://([a-z0-9][-a-z0-9]*)/([a-z0-9][-a-z0-9]*)(?::(\d{1,5}))?$")


@dataclass(frozen=True, slots=True)
class ServiceRef:
    namespace: str
    service: str
    port: int | None = None


def parse_target(text: str) -> ServiceRef:
    match = _TARGET.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Service: write k8s://NAMESPACE/SERVICE or k8s://NAMESPACE/SERVICE:PORT")
    namespace, service, port = match.groups()
    return ServiceRef(namespace, service, int(port) if port else None)


def _port(slice_: Any, wanted: int | None) -> int | None:
    ports = [p for p in (slice_.ports or []) if p.port]
    if wanted is not None:
        return wanted
    named = [p.port for p in ports if p.name == GRPC_PORT_NAME]
    if named:
        return int(named[0])
    return int(ports[0].port) if len(ports) == 1 else None


def endpoints_of(slices: Iterable[Any], wanted_port: int | None = None) -> dict[str, str]:
    """Ready endpoints as node name → host:port (EndpointSlice `conditions.ready` unset counts as ready)."""
    nodes: dict[str, str] = {}
    for slice_ in slices:
        port = _port(slice_, wanted_port)
        if port is None:
            log.warning("EndpointSlice %s has no port named %r and not exactly one port: skipped",
                        slice_.metadata.name, GRPC_PORT_NAME)
            continue
        for endpoint in slice_.endpoints or []:
            if endpoint.conditions is not None and endpoint.conditions.ready is False:
                continue
            if not endpoint.addresses:
                continue
            address = endpoint.addresses[0]
            host = f"[{address}]" if ":" in address else address
            name = endpoint.targetRef.name if endpoint.targetRef is not None else (endpoint.hostname or address)
            nodes[name] = f"{host}:{port}"
    return nodes


async def follow_service(target: str, update: Callable[[Mapping[str, str]], None],
                         on_error: Callable[[str], None] = lambda reason: None, client: Any = None) -> None:
    """Call `update` with the Service's ready endpoints on every change, until cancelled.

    `client` is a lightkube `AsyncClient`; by default one from the in-cluster service account or
    $KUBECONFIG.
    """
    from lightkube import AsyncClient
    from lightkube.resources.discovery_v1 import EndpointSlice

    ref = parse_target(target)
    client = client or AsyncClient()
    selector = {SERVICE_NAME_LABEL: ref.service}
    current: dict[str, str] | None = None

    def publish(slices: Mapping[str, Any]) -> None:
        nonlocal current
        found = endpoints_of(slices.values(), ref.port)
        if found != current:
            log.info("%s: %d ready endpoints: %s", target, len(found), ", ".join(sorted(found)) or "none")
            current = found
            update(found)

    while True:
        try:
            slices: dict[str, Any] = {}
            listing = client.list(EndpointSlice, namespace=ref.namespace, labels=selector)
            async for item in listing:
                slices[item.metadata.name] = item
            publish(slices)
            async for kind, item in client.watch(EndpointSlice, namespace=ref.namespace, labels=selector,
                                                 resource_version=listing.resourceVersion):
                if kind == "DELETED":
                    slices.pop(item.metadata.name, None)
                else:
                    slices[item.metadata.name] = item
                publish(slices)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # any failure of the API: keep routing on what was known
            known = "none" if current is None else f"{len(current)}: {', '.join(sorted(current)) or 'empty'}"
            log.warning("discovery of %s failed (%s: %s); keeping the last good node set (%s), retrying in %.0f s",
                        target, type(error).__name__, error, known, RETRY_S)
            on_error(type(error).__name__)
        await asyncio.sleep(RETRY_S)
