"""The gRPC servicer: validate → decide → forward → relay → record, converting protobuf at the edge.

Only this module and client.py import the generated `quantrouter.v1` code. Every error leaves as a
rich `google.rpc.Status` with an ErrorInfo reason (plus BadRequest field violations or RetryInfo),
built in one place, `status_of`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from quantrouter.capacity import DEFAULT_INTERVAL_S, duration_fields, duration_pb, memory_status_pb, variant_pb, watch
from quantrouter.config import LimitSettings, RequestDefaults
from quantrouter.errors import DOMAIN, FieldViolation, InvalidRequest, QuantrouterError, ShuttingDown
from quantrouter.listing import variant_rows
from quantrouter.policy import RoutingRequest
from quantrouter.quant import UnknownQuantizationError, parse_quantization
from quantrouter.router import Job, Router, failure_of
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from quantrouter.values import Assessment, Completion, Decision, Preference, quick_constructor

__all__ = ["SERVICE_NAME", "RequestReader", "RouterService", "completion_pb", "decision_pb", "status_of"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RouterService"].full_name

_PREFERENCES: dict[int, Preference] = {
    pb.PREFERENCE_UNSPECIFIED: Preference.BALANCED,
    pb.PREFERENCE_BALANCED: Preference.BALANCED,
    pb.PREFERENCE_QUALITY: Preference.QUALITY,
    pb.PREFERENCE_LATENCY: Preference.LATENCY,
}
_PREFERENCE_PB: dict[Preference, Any] = {v: k for k, v in _PREFERENCES.items() if k != pb.PREFERENCE_UNSPECIFIED}
_CHAT_ROLES = frozenset({"system", "user", "assistant"})
# A rough tokens-per-character figure for pricing prompt processing before the backend counts.
CHARS_PER_TOKEN = 4
# Sane bounds for options; Ollama itself accepts nearly anything and fails late or silently.
NUM_PREDICT_RANGE = (-2, 1 << 20)  # -1 = until stop, -2 = fill the context (Ollama's conventions)
NUM_CTX_RANGE = (1, 1 << 21)
TEMPERATURE_RANGE = (0.0, 5.0)
TOP_K_RANGE = (0, 1 << 20)
# The options bounded above, checked in this order.
_BOUNDED_OPTIONS = (("num_predict", NUM_PREDICT_RANGE), ("num_ctx", NUM_CTX_RANGE), ("temperature", TEMPERATURE_RANGE),
                    ("top_p", (0.0, 1.0)), ("top_k", TOP_K_RANGE))
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_MODEL_NAME = 256
MAX_CHAT_MESSAGES = 1024
# Built for every request: without the frozen `__init__`'s cost (`quick_constructor`).
_new_routing_request = quick_constructor(RoutingRequest)


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_of(error: QuantrouterError) -> status_pb2.Status:
    """The rich status for one of our errors (AIP-193: every error carries an ErrorInfo)."""
    details = [_packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata))]
    if error.violations:
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations])))
    if error.retry_after is not None:
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=duration_pb(error.retry_after))))
    return status_pb2.Status(code=getattr(code_pb2, error.code.name), message=error.message, details=details)


def _check(violations: list[FieldViolation], ok: bool, field: str, description: str) -> None:
    if not ok:
        violations.append(FieldViolation(field, description))


def _raise_if(violations: Sequence[FieldViolation]) -> None:
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidRequest(f"invalid request: {summary}", violations=tuple(violations))


class RequestReader:
    """Validation and conversion of requests, protobuf → ours; `resolve` names the family and pinned tag
    (a node router asks its catalog, a fleet router its nodes' catalogs)."""

    def __init__(self, defaults: RequestDefaults, limits: LimitSettings,
                 resolve: Callable[[str], tuple[str, str | None]]) -> None:
        self._defaults = defaults
        self._max_prompt_bytes = limits.max_prompt_bytes
        self._resolve = resolve
        self._default_floor = parse_quantization(defaults.min_quantization) if defaults.min_quantization else None

    def _routing_request(self, model: str, preference: int, constraints: pb.Constraints,
                         options: pb.GenerationOptions, prompt_chars: int, time_remaining: float | None,
                         violations: list[FieldViolation]) -> RoutingRequest:
        _check(violations, bool(model.strip()), "model", "name a model family (e.g. gemma3:270m) or an exact tag")
        _check(violations, len(model) <= MAX_MODEL_NAME, "model", f"longer than {MAX_MODEL_NAME} characters")
        _check(violations, preference in _PREFERENCES, "preference",
               f"unknown value {preference}; use QUALITY, BALANCED or LATENCY")
        floor = self._default_floor
        if constraints.min_quantization:
            try:
                floor = parse_quantization(constraints.min_quantization)
            except UnknownQuantizationError as error:
                violations.append(FieldViolation("constraints.min_quantization", str(error)))
        allowed = set()
        for i, name in enumerate(constraints.allowed_quantizations):
            try:
                allowed.add(parse_quantization(name).name)
            except UnknownQuantizationError as error:
                violations.append(FieldViolation(f"constraints.allowed_quantizations[{i}]", str(error)))
        min_tps = constraints.min_tokens_per_second
        _check(violations, math.isfinite(min_tps) and min_tps >= 0, "constraints.min_tokens_per_second",
               "must be a finite number ≥ 0")
        max_ttft = None
        if constraints.HasField("max_time_to_first_token"):
            max_ttft = constraints.max_time_to_first_token.ToNanoseconds() / 1e9
            _check(violations, max_ttft > 0, "constraints.max_time_to_first_token", "must be positive")
        self._check_options(options, violations)
        _raise_if(violations)
        family, pinned = self._resolve(model.strip())
        num_predict = options.num_predict if options.HasField("num_predict") else -1
        return _new_routing_request(
            family=family,
            preference=_PREFERENCES[preference],
            pinned_tag=pinned,
            prompt_tokens=prompt_chars // CHARS_PER_TOKEN + 1,
            num_predict=num_predict if num_predict > 0 else self._defaults.num_predict,
            num_ctx=options.num_ctx if options.HasField("num_ctx") else self._defaults.num_ctx,
            min_quantization=floor,
            allowed_quantizations=frozenset(allowed),
            min_tokens_per_second=min_tps,
            max_time_to_first_token=max_ttft,
            time_remaining=time_remaining,
        )

    @staticmethod
    def _check_options(options: pb.GenerationOptions, violations: list[FieldViolation]) -> None:
        for name, (low, high) in _BOUNDED_OPTIONS:
            # The message is written only for a value out of bounds: formatting it for every request was a third
            # of reading one.
            if options.HasField(name) and not (math.isfinite(value := getattr(options, name)) and low <= value <= high):
                violations.append(FieldViolation(f"options.{name}", f"{value} is outside [{low}, {high}]"))
        _check(violations, len(options.stop) <= MAX_STOP_SEQUENCES, "options.stop",
               f"at most {MAX_STOP_SEQUENCES} stop sequences")
        _check(violations, all(0 < len(s) <= MAX_STOP_LENGTH for s in options.stop), "options.stop",
               f"each stop sequence must have 1 to {MAX_STOP_LENGTH} characters")
        _check(violations, options.format in ("", "json"), "options.format", 'use "" for text or "json"')

    def _ollama_options(self, options: pb.GenerationOptions, request: RoutingRequest) -> dict[str, Any]:
        """Only what the caller set, plus one num_ctx per variant so Ollama never reloads over it."""
        result: dict[str, Any] = {"num_ctx": request.num_ctx}
        for name in ("num_predict", "temperature", "top_p", "top_k", "seed"):
            if options.HasField(name):
                result[name] = getattr(options, name)
        if options.stop:
            result["stop"] = list(options.stop)
        return result

    def _check_size(self, size: int, field: str, violations: list[FieldViolation]) -> None:
        limit = self._max_prompt_bytes
        _check(violations, size <= limit, field, f"{size} bytes is over the {limit}-byte limit")

    def generate(self, request: pb.GenerateRequest, time_remaining: float | None) -> tuple[RoutingRequest, Job]:
        routing = self.generate_routing(request, time_remaining)
        return routing, Job(prompt=request.prompt, system=request.system,
                            options=self._ollama_options(request.options, routing), format=request.options.format)

    def generate_routing(self, request: pb.GenerateRequest, time_remaining: float | None) -> RoutingRequest:
        """`generate`'s routing request alone, for a router that forwards the request as it came (a fleet)."""
        violations: list[FieldViolation] = []
        _check(violations, bool(request.prompt.strip()), "prompt", "must not be empty or only whitespace")
        self._check_size(len(request.prompt.encode()) + len(request.system.encode()), "prompt", violations)
        return self._routing_request(request.model, request.preference, request.constraints, request.options,
                                     len(request.prompt) + len(request.system), time_remaining, violations)

    def chat(self, request: pb.ChatRequest, time_remaining: float | None) -> tuple[RoutingRequest, Job]:
        routing = self.chat_routing(request, time_remaining)
        return routing, Job(messages=tuple({"role": m.role, "content": m.content} for m in request.messages),
                            options=self._ollama_options(request.options, routing), format=request.options.format,
                            chat=True)

    def chat_routing(self, request: pb.ChatRequest, time_remaining: float | None) -> RoutingRequest:
        """`chat`'s routing request alone, as `generate_routing`."""
        violations: list[FieldViolation] = []
        _check(violations, 0 < len(request.messages) <= MAX_CHAT_MESSAGES, "messages",
               f"give 1 to {MAX_CHAT_MESSAGES} messages")
        for i, message in enumerate(request.messages):
            _check(violations, message.role in _CHAT_ROLES, f"messages[{i}].role",
                   f"{message.role!r} is not one of system, user, assistant")
        _check(violations, any(m.content.strip() for m in request.messages), "messages",
               "at least one message must have content")
        size = sum(len(m.content.encode()) for m in request.messages)
        self._check_size(size, "messages", violations)
        return self._routing_request(request.model, request.preference, request.constraints, request.options,
                                     size, time_remaining, violations)

    def route(self, request: pb.RouteRequest, time_remaining: float | None) -> RoutingRequest:
        violations: list[FieldViolation] = []
        self._check_size(len(request.prompt.encode()), "prompt", violations)
        return self._routing_request(request.model, request.preference, request.constraints, request.options,
                                     len(request.prompt), time_remaining, violations)


class RouterService(pb_grpc.RouterServiceServicer):  # type: ignore[misc]
    def __init__(self, router: Router, reader: RequestReader, shutting_down: Callable[[], bool]) -> None:
        self._router = router
        self._reader = reader
        self._shutting_down = shutting_down

    # RPCs.

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        routing, job = self._reader.generate(request, context.time_remaining())
        async for event in self._relay(routing, job):
            yield pb.GenerateResponse(**event)

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[pb.ChatResponse]:
        routing, job = self._reader.chat(request, context.time_remaining())
        async for event in self._relay(routing, job):
            yield pb.ChatResponse(**event)

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:
        routing = self._reader.route(request, context.time_remaining())
        decision = self._router.decide(routing)
        if decision.chosen is None:  # the status Generate would answer, with every candidate's reason
            raise failure_of(decision)
        return pb.RouteResponse(decision=decision_pb(decision))

    async def ListVariants(self, request: pb.ListVariantsRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListVariantsResponse:
        router = self._router
        catalog = router.inventory.snapshot
        families = catalog.families
        if request.model:
            family, _ = router.resolve(request.model)
            families = [family]
        result = [pb.Family(name=family, variants=[variant_pb(v) for v in rows])
                  for family, rows in variant_rows(catalog, router.throughput.snapshot(), families,
                                                   router.quality_of).items()]
        return pb.ListVariantsResponse(families=result, memory=memory_status_pb(router.probe.latest))

    async def WatchCapacity(self, request: pb.WatchCapacityRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.NodeCapacity]:
        interval = request.interval.ToNanoseconds() / 1e9 if request.HasField("interval") else 0.0
        _raise_if([FieldViolation("interval", "must not be negative")] if interval < 0 else [])
        async for report in watch(self._router, interval or DEFAULT_INTERVAL_S):
            yield report

    # Relay, ours → protobuf.

    async def _relay(self, routing: RoutingRequest, job: Job) -> AsyncIterator[dict[str, Any]]:
        if self._shutting_down():
            raise ShuttingDown("the router is shutting down; retry on another replica")
        async for event in self._router.stream(routing, job):
            if isinstance(event, Decision):
                yield {"decision": decision_pb(event)}
            elif isinstance(event, Completion):
                yield {"completion": completion_pb(event)}
            else:
                yield {"chunk": pb.TextChunk(text=event)}


def decision_pb(decision: Decision) -> pb.RouteDecision:
    chosen = decision.chosen
    return pb.RouteDecision(
        model=decision.family, variant=chosen.tag if chosen else "", quantization=chosen.quantization if chosen
        else "", preference=_PREFERENCE_PB[decision.preference], reason=decision.reason,
        candidates=[_candidate_pb(a) for a in decision.candidates], fallback=decision.fallback,
        downgraded=decision.downgraded, memory_source=decision.memory_source,
        free_memory_bytes=decision.free_bytes, pinned=decision.pinned, node=decision.node)


def _candidate_pb(a: Assessment) -> pb.Candidate:
    return pb.Candidate(variant=a.tag, quantization=a.quantization, memory_bytes=a.memory_bytes, resident=a.resident,
                        tokens_per_second=a.tokens_per_second, tokens_per_second_measured=a.measured,
                        time_to_first_token=duration_fields(a.time_to_first_token),
                        expected_duration=duration_fields(a.expected_seconds), quality=a.quality, score=a.score,
                        feasible=a.feasible, rejection=a.rejection, node=a.node,
                        queue_duration=duration_fields(a.queue_seconds),
                        churn_duration=duration_fields(a.churn_seconds),
                        at_risk=a.at_risk, quality_measured=a.quality_measured, endangers=a.endangers,
                        held_back=a.held_back)


def completion_pb(c: Completion) -> pb.Completion:
    return pb.Completion(variant=c.variant, prompt_tokens=c.prompt_tokens, generated_tokens=c.generated_tokens,
                         tokens_per_second=c.tokens_per_second, prompt_tokens_per_second=c.prompt_tokens_per_second,
                         time_to_first_token=duration_fields(c.time_to_first_token),
                         load_duration=duration_fields(c.load_seconds), total_duration=duration_fields(c.total_seconds),
                         done_reason=c.done_reason)

