"""The Endpoint Picker's own metrics, beside the fleet's per-node gauges on the same registry.

`node` values are the configured or discovered node names, variants come from the nodes' catalogs, and
refusal reasons are a fixed set, so cardinality stays bounded by the fleet.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from quantrouter.metrics import TOKENS_PER_SECOND_BUCKETS, TTFT_BUCKETS

__all__ = ["GatewayMetrics"]

# The pick itself: parse, decide, rewrite (goal ≤ 3 ms at p50).
PICK_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.picks = Counter(
            "quantrouter_gateway_picks", "Requests routed by the picker, by node, family, variant and reason.",
            ["node", "model_name", "target_model_name", "preference", "reason"], registry=registry)
        self.refusals = Counter(
            "quantrouter_gateway_refusals", "Requests the picker answered itself, by HTTP status and reason.",
            ["status", "reason"], registry=registry)
        self.served = Counter(
            "quantrouter_gateway_served", "Responses by the node that served them (Envoy's served endpoint) and "
            "whether that was a fallback rather than the picked node.", ["node", "target_model_name", "fallback"],
            registry=registry)
        self.pick_seconds = Histogram(
            "quantrouter_gateway_pick_seconds", "Time from the request body's end to the picker's answer.",
            buckets=PICK_BUCKETS, registry=registry)
        self.time_to_first_byte = Histogram(
            "quantrouter_gateway_time_to_first_byte_seconds",
            "Time from the picker's answer to the first response body bytes from the model server.",
            ["node", "target_model_name"], buckets=TTFT_BUCKETS, registry=registry)
        self.tokens_per_second = Histogram(
            "quantrouter_gateway_tokens_per_second", "Decode tokens/sec the model server reported in its final "
            "Ollama chunk (eval_count / eval_duration), by the node that served it.",
            ["node", "target_model_name"], buckets=TOKENS_PER_SECOND_BUCKETS, registry=registry)
        self.in_flight = Gauge("quantrouter_gateway_in_flight_requests",
                               "Streams the picker routed whose response has not ended.", registry=registry)
