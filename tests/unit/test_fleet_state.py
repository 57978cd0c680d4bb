"""Reading a node's report: the real shape is taken in, every impossible figure is refused with a reason."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from quantrouter.capacity import SCHEMA_VERSION
from quantrouter.catalog import Resolution
from quantrouter.fleet.state import ReportRejected, Routed, read_report, same_report, with_routed
from quantrouter.policy import LOAD_WINDOW_S, InFlight
from quantrouter.units import MiB
from quantrouter.v1 import router_service_pb2 as pb


def report() -> pb.NodeCapacity:
    variant = pb.NodeVariant(
        variant=pb.Variant(tag="gemma3:270m-q8_0", quantization="Q8_0", size_bytes=278 * MiB, resident=True,
                           vram_bytes=300 * MiB, tokens_per_second=80.0, samples=3, quality=0.99,
                           tokens_per_second_measured=True),
        family="gemma3:270m", prompt_tokens_per_second=900.0, in_flight=1, queued_seconds=2.0,
        architecture=pb.Architecture(name="gemma3", block_count=18, head_count_kv=1, head_dim=256,
                                     context_length=32768))
    variant.load_duration.FromNanoseconds(400_000_000)
    return pb.NodeCapacity(
        schema_version=SCHEMA_VERSION, sequence=7, reserve_bytes=0, in_flight=1, max_in_flight=256,
        backlog_seconds=2.5, stream_backlog_seconds=[2.0, 0.5], backend_up=True, offered_load=0.4,
        streams=[pb.StreamInFlight(service_seconds=4.0, done=0.5, tokens_per_second=80.0, time_left_seconds=3.0,
                                   min_tokens_per_second=10.0),
                 pb.StreamInFlight(service_seconds=1.0, done=0.5, tokens_per_second=80.0)],
        names={"gemma3:270m": "gemma3:270m", "gemma3": "gemma3:270m"},
        memory=pb.MemoryStatus(source="nvml", free_bytes=10 * MiB, total_bytes=24 * MiB, gpus=[
            pb.GpuMemory(uuid="GPU-1", name="NVIDIA GeForce RTX 4090", free_bytes=10 * MiB, total_bytes=24 * MiB)]),
        variants=[variant])


def test_a_real_shaped_report_becomes_the_policys_values() -> None:
    state = read_report(report())
    (candidate,) = state.family("gemma3:270m")
    assert candidate.variant.quant.name == "Q8_0" and candidate.variant.resident
    assert candidate.variant.architecture is not None and candidate.variant.architecture.block_count == 18
    assert candidate.speed.load_seconds == pytest.approx(0.4) and candidate.speed.measured
    assert candidate.in_flight == 1 and candidate.queued_seconds == 2.0 and state.backlog_seconds == 2.5
    assert state.backlog == state.memory_view.backlog == (0.5, 2.0)  # ascending, as the policy reads it
    assert state.memory_view.free_bytes == 10 * MiB and state.gpu_names == ("NVIDIA GeForce RTX 4090",)
    assert state.resolve("gemma3") == Resolution("gemma3:270m")
    assert state.resolve(candidate.variant.tag) == Resolution("gemma3:270m", candidate.variant.tag)
    assert state.resolve("llama3") is None and state.families == ("gemma3:270m",)
    # The streams' SLOs and the offered load, for the node's in-flight guard and overload rule.
    view = state.memory_view
    assert view.in_flight == (InFlight(4.0, 0.5, 80.0, 3.0, 10.0), InFlight(1.0, 0.5, 80.0, None, 0.0))
    assert view.offered_load == pytest.approx(0.4) and view.shared


def _set(path: str, value: object) -> Callable[[pb.NodeCapacity], None]:
    def apply(message: pb.NodeCapacity) -> None:
        *parents, leaf = path.split(".")
        target: object = message
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)  # type: ignore[index]
        setattr(target, leaf, value)
    return apply


@pytest.mark.parametrize(("change", "reason"), [
    (_set("schema_version", SCHEMA_VERSION + 1), "schema_version"),
    (_set("memory.gpus.0.free_bytes", -1), "bad_memory"),
    (_set("memory.gpus.0.free_bytes", 25 * MiB), "bad_memory"),
    (_set("memory.free_bytes", 3 * MiB), "bad_memory"),
    (_set("reserve_bytes", -5), "bad_memory"),
    (_set("in_flight", -1), "bad_load"),
    (_set("backlog_seconds", math.nan), "bad_load"),
    (lambda message: message.stream_backlog_seconds.append(-1.0), "bad_load"),
    (_set("offered_load", -0.5), "bad_load"),
    (lambda message: message.streams.add(service_seconds=2.0, done=1.5, tokens_per_second=50.0), "bad_load"),
    (lambda message: message.streams.add(service_seconds=2.0, tokens_per_second=50.0, time_left_seconds=math.nan),
     "bad_load"),
    (_set("variants.0.queued_seconds", math.inf), "bad_load"),
    (_set("variants.0.variant.tokens_per_second", 0.0), "bad_speed"),
    (_set("variants.0.variant.tokens_per_second", math.inf), "bad_speed"),
    (_set("variants.0.prompt_tokens_per_second", -3.0), "bad_speed"),
    (_set("variants.0.variant.quantization", "Q9_X"), "bad_variant"),
    (_set("variants.0.variant.size_bytes", 0), "bad_variant"),
    (_set("variants.0.variant.quality", 1.5), "bad_variant"),
    (_set("variants.0.family", ""), "bad_variant"),
])
def test_impossible_figures_are_refused_with_a_reason(change: Callable[[pb.NodeCapacity], None],
                                                      reason: str) -> None:
    message = report()
    change(message)
    with pytest.raises(ReportRejected) as raised:
        read_report(message)
    assert raised.value.reason == reason and str(raised.value)


def test_a_tag_listed_twice_is_refused() -> None:
    message = report()
    message.variants.append(message.variants[0])
    with pytest.raises(ReportRejected, match="twice"):
        read_report(message)


def test_streams_sent_since_the_report_are_counted_as_the_node_router_will_count_them() -> None:
    """Two streams the fleet sent to the Q8_0 runner after the report: in flight and queued on that variant, in
    the backlog, the stream list (with their SLOs, nothing streamed yet) and the offered load."""
    state = read_report(report())
    tag = "gemma3:270m-q8_0"
    sent = with_routed(state, [Routed(tag, 1.5, 80.0, 6.0, 20.0), Routed(tag, 0.25, 80.0)])
    (q8,) = sent.family("gemma3:270m")
    assert q8.in_flight == 3 and q8.queued_seconds == pytest.approx(3.75)
    assert sent.in_flight == 3 and sent.backlog_seconds == pytest.approx(4.25)
    assert sent.backlog == (0.25, 0.5, 1.5, 2.0) and sent.memory_view.backlog == sent.backlog
    assert sent.streams[2:] == (InFlight(1.5, 0.0, 80.0, 6.0, 20.0), InFlight(0.25, 0.0, 80.0, None, 0.0))
    assert sent.offered_load == pytest.approx(0.4 + 1.75 / LOAD_WINDOW_S)
    assert sent.memory == state.memory and sent.sequence == state.sequence
    assert with_routed(state, []) is state
    full = with_routed(read_report(report()), [Routed(tag, 1.0, 80.0)] * 255)
    assert full.at_limit  # the node router's in-flight limit counts what the fleet sent it too


def test_a_report_that_differs_only_in_its_sequence_number_is_the_same_report() -> None:
    """What lets the fleet skip reading a quiet node's periodic report again; any other figure makes it new, and
    neither report is changed by the comparison."""
    last, again = report(), report()
    again.sequence = 8
    assert same_report(last, again) and again.sequence == 8 and last.sequence == 7
    again.variants[0].queued_seconds = 2.5
    assert not same_report(last, again)
    moved = report()
    moved.memory.gpus[0].free_bytes -= 1
    assert not same_report(last, moved)


def test_a_states_per_report_values_match_its_figures() -> None:
    """`memory_view`, `family` and `candidate` are built once with the state: the same as computing them anew."""
    state = read_report(report())
    view = state.memory_view
    assert (view.free_bytes, view.source, view.backlog, view.in_flight, view.offered_load, view.shared) == (
        10 * MiB, "nvml", (0.5, 2.0), state.streams, 0.4, True)
    assert state.family("gemma3:270m") == state.candidates and state.family("other") == ()
    assert state.candidate("gemma3:270m-q8_0") is state.candidates[0] and state.candidate("missing") is None


def test_variants_read_before_read_the_same_and_a_changed_or_rejected_one_is_read_anew() -> None:
    """`read_report` keeps the variants it has read by their wire bytes: a repeated variant gives an equal value,
    a changed figure is read again, and a rejected variant is never kept (it is refused every time)."""
    first, again = read_report(report()), read_report(report())
    assert again.candidates == first.candidates
    busier = report()
    busier.variants[0].queued_seconds = 5.0
    assert read_report(busier).candidates[0].queued_seconds == 5.0
    broken = report()
    broken.variants[0].variant.tokens_per_second = -1.0
    for _ in range(2):
        with pytest.raises(ReportRejected, match="tok/s"):
            read_report(broken)


def test_a_familys_variants_read_from_reports_share_one_architecture_object() -> None:
    """The policy caches a decision's context bytes by the architecture's identity: equal architectures read from
    different variants and reports are one object, so each decision works them out once per family."""
    second = report()
    other = second.variants.add()
    other.CopyFrom(second.variants[0])
    other.variant.tag, other.variant.quantization, other.variant.resident = "gemma3:270m-q4_K_M", "Q4_K_M", False
    first, q8, q4 = read_report(report()).candidates[0], *read_report(second).candidates
    assert first.variant.architecture is q8.variant.architecture is q4.variant.architecture is not None
