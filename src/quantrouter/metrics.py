"""Every Prometheus metric the router exports, defined once in `Metrics(registry)`.

Names follow Prometheus's naming guide (`quantrouter_` prefix, base units, `_total` counters) and the
field's label names (docs/conventions.md §3): `model_name` is the requested family,
`target_model_name` the variant served. Label values come only from the discovered catalog and from
closed sets (preferences, reasons, gRPC codes); a name the catalog does not know is recorded as `other`.
gRPC server metrics reuse go-grpc-prometheus's names so existing dashboards read them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["OTHER", "Metrics", "VariantState", "children"]

OTHER = "other"

# OpenTelemetry GenAI semantic conventions' recommended buckets (docs/conventions.md §3).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000)
DECISION_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)

_VARIANT = ("model_name", "target_model_name", "quantization")


def children(metric: Counter | Gauge | Histogram) -> Callable[..., Any]:
    """`metric.labels` remembered: prometheus_client checks and converts the values and takes a lock on every
    `labels()` call (about 9 µs on the benchmark machine, against well under 1 µs for this lookup), and a request
    makes a dozen. Label values are bounded (module docstring), so is this; no metric here is ever `remove`d."""
    known: dict[tuple[str, ...], Any] = {}

    def child(*values: str) -> Any:
        found = known.get(values)
        if found is None:
            found = known[values] = metric.labels(*values)
        return found

    return child


@dataclass(frozen=True, slots=True)
class VariantState:
    """One variant as the router sees it at scrape time: the row behind the per-variant gauges."""

    family: str
    tag: str
    quantization: str
    resident: bool
    vram_bytes: int
    tokens_per_second: float
    breaker_open: bool


class Metrics:
    """The router's metrics on one registry; tests pass a fresh `CollectorRegistry()`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "quantrouter_requests", "Finished Generate/Chat requests by family, variant and gRPC code.",
            ["model_name", "target_model_name", "quantization", "preference", "code"], registry=registry)
        self.decisions = Counter(
            "quantrouter_route_decisions", "Routing decisions by family, chosen variant, preference and reason.",
            ["model_name", "target_model_name", "quantization", "preference", "reason"], registry=registry)
        self.substitutions = Counter(
            "quantrouter_route_substitutions",
            "Requests served by another variant than the unconstrained first choice (fallback, downgrade).",
            ["model_name", "target_model_name", "kind"], registry=registry)
        self.fallbacks = Counter(
            "quantrouter_fallbacks", "Variants that failed before their first token, so the next one was tried.",
            ["model_name", "target_model_name", "reason"], registry=registry)
        self.prompt_tokens = Counter(
            "quantrouter_prompt_tokens", "Prompt tokens evaluated by the backend.", _VARIANT, registry=registry)
        self.generated_tokens = Counter(
            "quantrouter_generated_tokens", "Tokens generated and relayed.", _VARIANT, registry=registry)
        self.breaker_trips = Counter(
            "quantrouter_breaker_trips", "Times a variant was skipped for a cool-down after repeated failures.",
            ["model_name", "target_model_name"], registry=registry)
        self.request_duration = Histogram(
            "quantrouter_request_duration_seconds", "Time from request to the stream's end.",
            ["model_name", "target_model_name", "preference"], buckets=DURATION_BUCKETS, registry=registry)
        self.time_to_first_token = Histogram(
            "quantrouter_time_to_first_token_seconds", "Time from request to the first relayed text.",
            ["model_name", "target_model_name", "preference"], buckets=TTFT_BUCKETS, registry=registry)
        self.delivered_tokens_per_second = Histogram(
            "quantrouter_delivered_tokens_per_second", "Decode speed per request (eval_count / eval_duration).",
            _VARIANT, buckets=TOKENS_PER_SECOND_BUCKETS, registry=registry)
        self.load_duration = Histogram(
            "quantrouter_load_duration_seconds", "Model load time reported by the backend (cold starts).",
            _VARIANT, buckets=LOAD_BUCKETS, registry=registry)
        self.decision_duration = Histogram(
            "quantrouter_decision_duration_seconds", "Time the policy took to decide.",
            buckets=DECISION_BUCKETS, registry=registry)
        self.in_flight = Gauge(
            "quantrouter_in_flight_requests", "Generate/Chat streams in progress.", ["model_name"],
            registry=registry)
        self.grpc_started = Counter(
            "grpc_server_started", "RPCs started on the server.",
            ["grpc_type", "grpc_service", "grpc_method"], registry=registry)
        self.grpc_handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, regardless of success or failure.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"], registry=registry)
        self.grpc_handling_seconds = Histogram(
            "grpc_server_handling_seconds", "Response latency of RPCs handled by the server.",
            ["grpc_type", "grpc_service", "grpc_method"], buckets=DURATION_BUCKETS, registry=registry)
        self.grpc_msg_sent = Counter(
            "grpc_server_msg_sent", "Stream messages sent by the server.",
            ["grpc_type", "grpc_service", "grpc_method"], registry=registry)
        self._requests, self._decisions = children(self.requests), children(self.decisions)
        self._substitutions, self._fallbacks = children(self.substitutions), children(self.fallbacks)
        self._prompt_tokens, self._generated_tokens = children(self.prompt_tokens), children(self.generated_tokens)
        self._breaker_trips, self._request_duration = children(self.breaker_trips), children(self.request_duration)
        self._time_to_first_token = children(self.time_to_first_token)
        self._delivered_tokens_per_second = children(self.delivered_tokens_per_second)
        self._load_duration, self._in_flight = children(self.load_duration), children(self.in_flight)
        self.grpc_started_of, self.grpc_handled_of = children(self.grpc_started), children(self.grpc_handled)
        self.grpc_handling_seconds_of = children(self.grpc_handling_seconds)
        self.grpc_msg_sent_of = children(self.grpc_msg_sent)

    # What the router reports as it works (router.Recorder); the label order lives here, beside the metrics.

    def decision_timed(self, seconds: float) -> None:
        self.decision_duration.observe(seconds)

    def decided(self, family: str, tag: str, quantization: str, preference: str, reason: str) -> None:
        self._decisions(family, tag, quantization, preference, reason).inc()

    def substituted(self, family: str, tag: str, kind: str) -> None:
        self._substitutions(family, tag, kind).inc()

    def refused(self, family: str, preference: str, code: str) -> None:
        """A request shed before its stream existed: no variant, no duration."""
        self._requests(family, OTHER, OTHER, preference, code).inc()

    def stream_opened(self, family: str) -> None:
        self._in_flight(family).inc()

    def stream_closed(self, family: str, tag: str, quantization: str, preference: str, code: str,
                      seconds: float) -> None:
        self._in_flight(family).dec()
        self._requests(family, tag, quantization, preference, code).inc()
        self._request_duration(family, tag, preference).observe(seconds)

    def first_token(self, family: str, tag: str, preference: str, seconds: float) -> None:
        self._time_to_first_token(family, tag, preference).observe(seconds)

    def fell_back(self, family: str, tag: str, reason: str) -> None:
        self._fallbacks(family, tag, reason).inc()

    def breaker_tripped(self, family: str, tag: str) -> None:
        self._breaker_trips(family, tag).inc()

    def generated(self, family: str, tag: str, quantization: str, prompt_tokens: int, generated_tokens: int,
                  tokens_per_second: float, load_seconds: float | None) -> None:
        """One finished generation; `load_seconds` only when it paid a cold load."""
        labels = (family, tag, quantization)
        self._prompt_tokens(*labels).inc(prompt_tokens)
        self._generated_tokens(*labels).inc(generated_tokens)
        if tokens_per_second:
            self._delivered_tokens_per_second(*labels).observe(tokens_per_second)
        if load_seconds:
            self._load_duration(*labels).observe(load_seconds)

    def watch_memory(self, read: Callable[[], Iterable[tuple[str, str, int, int]]]) -> None:
        """Export GPU memory at scrape time from `read()` → (gpu, source, free, total) rows."""
        self.registry.register(_MemoryCollector(read))

    def watch_variants(self, read: Callable[[], Iterable[VariantState]], backend_up: Callable[[], bool]) -> None:
        """Export the per-variant gauges and `quantrouter_backend_up` at scrape time.

        Read from the router's latest catalog, speeds and breaker rather than set as they change, so a
        variant that left the backend leaves the exposition with it (a set gauge would stay for ever).
        """
        self.registry.register(_VariantCollector(read, backend_up))


class _MemoryCollector(Collector):
    """Reads the memory probe's latest snapshot when Prometheus scrapes, never on the request path."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, int, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        free = GaugeMetricFamily("quantrouter_gpu_memory_free_bytes",
                                 "Free GPU memory as the router sees it.", labels=["gpu", "source"])
        total = GaugeMetricFamily("quantrouter_gpu_memory_total_bytes",
                                  "Total GPU memory as the router sees it.", labels=["gpu", "source"])
        for gpu, source, free_bytes, total_bytes in self._read():
            free.add_metric([gpu, source], free_bytes)
            total.add_metric([gpu, source], total_bytes)
        yield free
        yield total


class _VariantCollector(Collector):
    """The per-variant gauges, rebuilt from the router's state on every scrape."""

    def __init__(self, read: Callable[[], Iterable[VariantState]], backend_up: Callable[[], bool]) -> None:
        self._read = read
        self._backend_up = backend_up

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("quantrouter_backend_up", "1 when the last call to the backend (Ollama) succeeded.")
        up.add_metric([], 1 if self._backend_up() else 0)
        resident = GaugeMetricFamily("quantrouter_variant_resident",
                                     "1 when the variant is loaded in the backend (/api/ps).", labels=_VARIANT)
        vram = GaugeMetricFamily("quantrouter_variant_vram_bytes",
                                 "GPU memory the variant holds (/api/ps size_vram).", labels=_VARIANT)
        speed = GaugeMetricFamily(
            "quantrouter_variant_tokens_per_second",
            "Decode tokens/sec the policy uses for the variant (EWMA of measurements, or the prior).", labels=_VARIANT)
        breaker = GaugeMetricFamily("quantrouter_variant_breaker_open",
                                    "1 while the variant is skipped after repeated failures.",
                                    labels=["model_name", "target_model_name"])
        for v in self._read():
            labels = [v.family, v.tag, v.quantization]
            resident.add_metric(labels, 1 if v.resident else 0)
            vram.add_metric(labels, v.vram_bytes)
            speed.add_metric(labels, v.tokens_per_second)
            breaker.add_metric([v.family, v.tag], 1 if v.breaker_open else 0)
        yield from (up, resident, vram, speed, breaker)
