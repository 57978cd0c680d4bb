"""The fleet router's own metrics: everything per `node`, on the registry the router's metrics use.

Counters and histograms are updated on the request path; the nodes' state (up, report age, memory,
load, per-variant speeds) is read from the node set when Prometheus scrapes, so a node that leaves
the set leaves the metrics too. `node` values are the configured or discovered node names, and
variant values come from the nodes' catalogs, so cardinality stays bounded by the fleet.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from quantrouter.fleet.nodes import NodeSet
from quantrouter.metrics import TTFT_BUCKETS

__all__ = ["FleetMetrics"]


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry, nodes: NodeSet) -> None:
        self.decisions = Counter(
            "quantrouter_fleet_route_decisions", "Fleet routing decisions by node, family, variant and reason.",
            ["node", "model_name", "target_model_name", "preference", "reason"], registry=registry)
        self.requests = Counter(
            "quantrouter_fleet_requests", "Finished Generate/Chat requests by serving node, variant and gRPC code.",
            ["node", "model_name", "target_model_name", "code"], registry=registry)
        self.fallbacks = Counter(
            "quantrouter_fleet_fallbacks",
            "(node, variant) pairs that failed before their first token, so the next one was tried.",
            ["node", "target_model_name", "code"], registry=registry)
        self.rejected_reports = Counter(
            "quantrouter_fleet_node_reports_rejected",
            "Node reports that could not be trusted (impossible memory, unknown schema version, ...).",
            ["node", "reason"], registry=registry)
        self.discovery_errors = Counter(
            "quantrouter_fleet_discovery_errors",
            "Failed node discoveries (the last good node set was kept), by error type.", ["error"],
            registry=registry)
        self.time_to_first_token = Histogram(
            "quantrouter_fleet_time_to_first_token_seconds", "Time from request to the first relayed text.",
            ["node", "model_name", "target_model_name"], buckets=TTFT_BUCKETS, registry=registry)
        registry.register(_NodeCollector(nodes))


class _NodeCollector(Collector):
    """The nodes' last reports, read at scrape time."""

    def __init__(self, nodes: NodeSet) -> None:
        self._nodes = nodes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("quantrouter_fleet_node_up", "1 while the node is used for routing.", labels=["node"])
        age = GaugeMetricFamily("quantrouter_fleet_node_report_age_seconds",
                                "Seconds since the node's last accepted report.", labels=["node"])
        free = GaugeMetricFamily("quantrouter_fleet_node_memory_free_bytes", "Free GPU memory the node reports.",
                                 labels=["node", "source"])
        total = GaugeMetricFamily("quantrouter_fleet_node_memory_total_bytes", "Total GPU memory the node reports.",
                                  labels=["node", "source"])
        in_flight = GaugeMetricFamily("quantrouter_fleet_node_in_flight_requests",
                                      "Streams in progress on the node.", labels=["node"])
        backlog = GaugeMetricFamily("quantrouter_fleet_node_backlog_seconds",
                                    "Expected seconds of work ahead of the node's streams.", labels=["node"])
        tps = GaugeMetricFamily("quantrouter_fleet_node_variant_tokens_per_second",
                                "Decode tokens/sec the node reports for the variant (measured EWMA or prior).",
                                labels=["node", "model_name", "target_model_name", "quantization"])
        for name, node in sorted(self._nodes.nodes.items()):
            up.add_metric([name], 0 if self._nodes.why_not(node) else 1)
            state = node.state
            if state is None:
                continue
            age.add_metric([name], self._nodes.age(node))
            free.add_metric([name, state.memory.source], state.memory.free_bytes)
            total.add_metric([name, state.memory.source], state.memory.total_bytes)
            in_flight.add_metric([name], state.in_flight)
            backlog.add_metric([name], state.backlog_seconds)
            for c in state.candidates:
                tps.add_metric([name, c.variant.family, c.variant.tag, c.variant.quant.name], c.speed.decode_tps)
        yield from (up, age, free, total, in_flight, backlog, tps)
