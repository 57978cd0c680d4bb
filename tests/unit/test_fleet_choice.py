"""The fleet's choice, table-driven: an RTX 4090 (24 GB) beside H100s (80 GB) serving Llama-3.1-8B."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from quantrouter.catalog import Architecture, VariantInfo
from quantrouter.fleet.choice import QUEUE_OVERLOAD_S, choose, delay_to_others, pick
from quantrouter.fleet.state import NodeState
from quantrouter.memory import GpuMemory, MemorySnapshot
from quantrouter.policy import CandidateInput, PolicyConfig, RoutingRequest, decide
from quantrouter.quant import parse_quantization
from quantrouter.throughput import SpeedEstimate
from quantrouter.values import FailureKind, Preference

GIB = 1 << 30
FAMILY = "llama3.1:8b-instruct"
LLAMA_8B = Architecture("llama", block_count=32, head_count_kv=8, head_dim=128, context_length=131072)
# File sizes in GiB, llama.cpp perplexity README for LLaMA 3 8B (docs/quantization.md §1b).
LADDER_GIB = {"F16": 14.97, "Q8_0": 7.96, "Q4_K_M": 4.58}
# Decode tok/s roughly ∝ bandwidth / size: an H100 SXM (3.35 TB/s) and an RTX 4090 (1.0 TB/s).
H100_TPS = {"F16": 160.0, "Q8_0": 280.0, "Q4_K_M": 420.0}
RTX4090_TPS = {"F16": 55.0, "Q8_0": 100.0, "Q4_K_M": 160.0}
CONFIG = PolicyConfig()


def node(free_gib: float, tps: dict[str, float], resident: Sequence[str] = (), streams: Mapping[str, float] = {},
         in_flight: int = 0, max_in_flight: int = 0) -> NodeState:
    """A node as its report reads; `streams` puts one stream with that many seconds still ahead on a variant
    (by quantization), which also makes it resident."""
    resident = {*resident, *streams}
    candidates = tuple(
        CandidateInput(VariantInfo(f"{FAMILY}-{q.lower()}", FAMILY, parse_quantization(q), int(gib * GIB),
                                   architecture=LLAMA_8B, resident=q in resident,
                                   vram_bytes=int(gib * GIB) if q in resident else 0),
                       SpeedEstimate(tps[q], 5000.0, 4.0, 10, True), parse_quantization(q).quality,
                       int(q in streams), queued_seconds=streams.get(q, 0.0))
        for q, gib in LADDER_GIB.items())
    free = int(free_gib * GIB)
    backlog = tuple(sorted(streams.values()))
    return NodeState(MemorySnapshot("nvml", (GpuMemory("GPU-0", "gpu", free, free),)), 0, candidates,
                     {FAMILY: FAMILY}, in_flight + len(streams), max_in_flight, backlog=backlog)


def request(preference: Preference, **fields: object) -> RoutingRequest:
    return RoutingRequest(FAMILY, preference, num_predict=256, num_ctx=4096, **fields)  # type: ignore[arg-type]


def test_each_node_is_decided_as_its_own_router_would_and_the_decision_names_the_node() -> None:
    nodes = {"rtx4090": node(18, RTX4090_TPS), "h100": node(78, H100_TPS)}
    chosen = choose(request(Preference.QUALITY), nodes, CONFIG)
    alone = decide(request(Preference.QUALITY), nodes["h100"].family(FAMILY), nodes["h100"].memory_view, CONFIG)
    assert chosen.node == "h100" and chosen.chosen is not None and chosen.chosen.node == "h100"
    assert alone.chosen is not None and chosen.chosen.tag == alone.chosen.tag == f"{FAMILY}-f16"
    assert {(c.node, c.tag) for c in chosen.candidates} == {(n, f"{FAMILY}-{q.lower()}")
                                                             for n in nodes for q in LADDER_GIB}
    rejected = next(c for c in chosen.candidates if c.node == "rtx4090" and c.quantization == "F16")
    assert "needs" in rejected.rejection  # 15 GiB + KV is more than 80 % of 18 GiB free


def test_a_nodes_streams_are_priced_as_its_own_router_prices_them_and_a_full_node_offers_nothing() -> None:
    idle = choose(request(Preference.LATENCY), {"a": node(78, H100_TPS), "b": node(78, H100_TPS)}, CONFIG)
    assert idle.node == "a"  # a tie: the first name
    busy = node(78, H100_TPS, streams={"Q4_K_M": 3.0})
    queued = choose(request(Preference.LATENCY), {"a": busy, "b": node(78, H100_TPS, resident=["Q4_K_M"])}, CONFIG)
    alone = decide(request(Preference.LATENCY), busy.family(FAMILY), busy.memory_view, CONFIG)
    assert queued.node == "b" and alone.chosen is not None
    own = next(c for c in queued.candidates if c.node == "a" and c.tag == alone.chosen.tag)
    assert own.queue_seconds == alone.chosen.queue_seconds > 0  # node a's own numbers, queue included
    full = choose(request(Preference.LATENCY), {"a": node(78, H100_TPS, in_flight=4, max_in_flight=4),
                                                "b": node(78, H100_TPS, streams={"Q4_K_M": 30.0})}, CONFIG)
    assert full.node == "b"
    # A slower, idle 4090 still beats an H100 whose Q4_K_M runner has half a minute of work ahead of it.
    behind = choose(request(Preference.LATENCY), {"h100": node(78, H100_TPS, streams={"Q4_K_M": 30.0}),
                                                  "rtx4090": node(18, RTX4090_TPS, resident=["Q4_K_M"])}, CONFIG)
    assert behind.node == "rtx4090" and "ranked first of 2 nodes" in behind.reason


def test_excluded_pairs_fall_back_to_the_next_pair_and_nothing_left_says_why_per_node() -> None:
    nodes = {"a": node(78, H100_TPS), "b": node(18, RTX4090_TPS)}
    f16 = f"{FAMILY}-f16"
    fallback = choose(request(Preference.QUALITY), nodes, CONFIG, frozenset({("a", f16)}))
    assert fallback.fallback and fallback.node == "a" and fallback.chosen is not None
    assert fallback.chosen.quantization == "Q8_0"  # the next pair by quality: Q8_0 on a (faster than on b)
    everything = frozenset((n, f"{FAMILY}-{q.lower()}") for n in nodes for q in LADDER_GIB)
    none = choose(request(Preference.QUALITY), nodes, CONFIG, everything)
    assert none.chosen is None and none.failure is FailureKind.CONSTRAINTS
    assert "node a:" in none.reason and "node b:" in none.reason


def test_failure_kinds_follow_what_stood_in_the_way_on_every_node() -> None:
    tiny = {"a": node(2, H100_TPS), "b": node(3, RTX4090_TPS)}
    assert choose(request(Preference.QUALITY), tiny, CONFIG).failure is FailureKind.MEMORY
    unknown = choose(RoutingRequest("other:1b"), tiny, CONFIG)
    assert unknown.failure is FailureKind.EMPTY
    assert choose(request(Preference.QUALITY), {}, CONFIG).reason.endswith("(no live node)")


def test_what_a_pick_costs_the_nodes_other_streams_is_ranked_as_churn() -> None:
    """Node b runs a 30 s stream on F16: a LATENCY request on its idle Q4_K_M runner time-slices beside it, so
    it finishes about one decode later than alone and delays that stream by as much. Node a's Q4_K_M runner
    has 0.9 s left of a stream: the request queues behind it and delays nobody. By its own numbers b is
    quicker; with what it costs the F16 stream, a is ranked first."""
    beside = node(78, H100_TPS, resident=["Q4_K_M"], streams={"F16": 30.0})
    behind = node(78, H100_TPS, streams={"Q4_K_M": 0.9})
    q4 = f"{FAMILY}-q4_k_m"
    picks = {name: decide(request(Preference.LATENCY), state.family(FAMILY), state.memory_view, CONFIG).chosen
             for name, state in (("b", beside), ("a", behind))}
    assert all(pick is not None and pick.tag == q4 for pick in picks.values())
    own_b, own_a = picks["b"], picks["a"]
    assert own_b is not None and own_a is not None and own_b.expected_seconds < own_a.expected_seconds
    decode = own_b.expected_seconds - own_b.time_to_first_token
    assert delay_to_others(beside, own_b) == pytest.approx(decode) and delay_to_others(behind, own_a) == 0.0
    chosen = choose(request(Preference.LATENCY), {"a": behind, "b": beside}, CONFIG)
    assert chosen.node == "a" and chosen.chosen is not None and chosen.chosen.churn_seconds == 0.0
    alone = choose(request(Preference.LATENCY), {"b": beside}, CONFIG)
    assert alone.chosen is not None and alone.chosen.churn_seconds == pytest.approx(decode)
    assert alone.chosen.expected_seconds == own_b.expected_seconds  # the node's own numbers are kept
    assert "delays the node's other streams by" in alone.reason
    assert next(c for c in alone.candidates if c.tag == q4) == alone.chosen  # the ranked pick is the one listed


def test_every_feasible_pair_is_ranked_not_only_each_nodes_own_pick() -> None:
    """A busy H100 (offered load above `quiet_load`): its own router, which must serve whatever comes next, takes
    BALANCED's quicker Q4_K_M; the fleet, which can send the next caller elsewhere, ranks the node's every pair
    with the deadline's share and takes the better quality that still finishes well within it."""
    busy = replace(node(78, H100_TPS, resident=list(LADDER_GIB)), offered_load=0.8)
    balanced = request(Preference.BALANCED, time_remaining=30.0)
    own = decide(balanced, busy.family(FAMILY), busy.memory_view, CONFIG).chosen
    chosen = choose(balanced, {"h100": busy}, CONFIG)
    assert own is not None and own.quantization == "Q4_K_M"
    assert chosen.chosen is not None and chosen.chosen.quantization == "F16" and chosen.node == "h100"
    listed = next(c for c in chosen.candidates if c.tag == chosen.chosen.tag)
    assert listed == chosen.chosen and listed.expected_seconds < 15.0  # the node's own numbers, within the share
    assert f"over the node's own pick {own.tag}" in chosen.reason
    # A pair that is not a node's own pick still carries what it costs the node's other streams.
    shared = replace(node(78, H100_TPS, resident=["Q4_K_M", "Q8_0"], streams={"F16": 30.0}), offered_load=0.8)
    beside = choose(request(Preference.BALANCED, time_remaining=30.0), {"h100": shared}, CONFIG)
    assert beside.chosen is not None and beside.chosen.tag != f"{FAMILY}-f16"
    assert 0 < beside.chosen.churn_seconds == pytest.approx(delay_to_others(shared, beside.chosen))


def test_quality_is_ranked_with_the_busy_band_while_half_the_offering_nodes_are_under_load() -> None:
    """Two H100s holding F16 and Q8_0. Quiet, QUALITY takes F16. With node b under load (offered load above
    `quiet_load`, below overload), b's own router counts Q8_0 (0.977) as equal to F16 and takes it, being faster;
    with half its nodes under load the fleet ranks QUALITY with that band too, on every node, rather than send
    the caller's long F16 decode to a busy fleet. One loaded node of three leaves room: F16. BALANCED keeps the
    quiet band (its score weighs speed itself)."""
    quiet = node(78, H100_TPS, resident=["F16", "Q8_0"])
    loaded = replace(quiet, offered_load=0.5)
    assert CONFIG.quiet_load < loaded.offered_load < CONFIG.overload_threshold
    quality = request(Preference.QUALITY, time_remaining=30.0)
    calm = choose(quality, {"a": quiet, "b": quiet}, CONFIG)
    assert calm.chosen is not None and calm.chosen.quantization == "F16" and "count as equal" not in calm.reason
    own = decide(quality, loaded.family(FAMILY), loaded.memory_view, CONFIG).chosen
    assert own is not None and own.quantization == "Q8_0"  # the node router's own busy band
    busy = choose(quality, {"a": quiet, "b": loaded}, CONFIG)
    assert busy.chosen is not None and busy.chosen.quantization == "Q8_0"
    assert busy.chosen.expected_seconds < next(c.expected_seconds for c in busy.candidates
                                               if c.node == busy.node and c.quantization == "F16")
    assert f"1 of 2 nodes under load (offered load > {CONFIG.quiet_load:g}): qualities within " \
           f"{CONFIG.busy_quality_tolerance:g} of the best count as equal" in busy.reason
    roomy = choose(quality, {"a": quiet, "b": loaded, "c": quiet}, CONFIG)
    assert roomy.chosen is not None and roomy.chosen.quantization == "F16" and roomy.node != "b"
    below = choose(quality, {"a": quiet, "b": replace(quiet, offered_load=CONFIG.quiet_load)}, CONFIG)
    assert below.chosen is not None and below.chosen.quantization == "F16"  # at quiet_load a node is still quiet
    balanced = choose(request(Preference.BALANCED, time_remaining=30.0), {"a": quiet, "b": loaded}, CONFIG)
    assert balanced.chosen is not None and balanced.chosen.quantization == "F16"


def test_a_request_the_fleets_pick_would_finish_past_its_deadline_is_refused_up_front() -> None:
    """Two H100s with 6 GiB free, each with Q4_K_M resident and 30 s of work ahead of it: Q4_K_M alone takes
    well under a second, so no variant is ruled out by the deadline on its own, but behind the queue the pick
    expects 30 s. Sent, it would hold the GPU until its deadline cancelled it; a caller with more time is served."""
    nodes = {"a": node(6, H100_TPS, streams={"Q4_K_M": 30.0}), "b": node(6, H100_TPS, streams={"Q4_K_M": 30.0})}
    refused = choose(request(Preference.LATENCY, time_remaining=10.0), nodes, CONFIG)
    assert refused.chosen is None and refused.failure is FailureKind.DEADLINE
    assert refused.best_expected_seconds > 30.0
    assert "past the 10.00 s left before the deadline" in refused.reason and "on node a" in refused.reason
    assert all(not c.rejection for c in refused.candidates if c.quantization == "Q4_K_M")
    for roomy in (request(Preference.LATENCY, time_remaining=40.0), request(Preference.LATENCY)):
        served = choose(roomy, nodes, CONFIG)
        assert served.chosen is not None and served.chosen.quantization == "Q4_K_M"


def test_the_fleet_counts_a_node_with_work_queued_for_a_slot_as_overloaded() -> None:
    """A quiet-looking H100 (offered load 0) whose Q4_K_M runner has three requests, 6 s of work, one at a time:
    its own router, with the rule off, still starts F16 for a QUALITY caller beside the queue; the fleet holds F16
    back (a burst fills the queues before the load window) and joins the queue on the quick runner."""
    state = node(78, H100_TPS, resident=["F16", "Q8_0"], streams={"Q4_K_M": 6.0})
    queued = replace(state, candidates=tuple(replace(c, in_flight=3) if c.in_flight else c for c in state.candidates))
    quality = request(Preference.QUALITY)
    own = decide(quality, queued.family(FAMILY), queued.memory_view, CONFIG).chosen
    assert CONFIG.queue_overload_seconds == 0 and own is not None and own.quantization == "F16"
    fleet = choose(quality, {"a": queued}, CONFIG)
    assert fleet.chosen is not None and fleet.chosen.quantization == "Q4_K_M"
    f16 = next(c for c in fleet.candidates if c.quantization == "F16")
    assert f"4.0 s of work queued for a slot ≥ {QUEUE_OVERLOAD_S:g} s" in f16.held_back


def test_the_fleet_prices_a_queued_wait_time_sliced_by_the_nodes_other_runners() -> None:
    """Q8_0's runner has 6 s of work ahead and F16's 20 s on the same H100: the fleet counts F16 time-slicing the GPU
    through the whole wait for Q8_0's slot, where the node router's default counts it over the service alone."""
    busy = node(78, H100_TPS, streams={"Q8_0": 6.0, "F16": 20.0})
    quality = request(Preference.QUALITY)
    fleet = choose(quality, {"a": busy}, CONFIG)
    q8 = next(c for c in fleet.candidates if c.quantization == "Q8_0")
    own = decide(quality, busy.family(FAMILY), busy.memory_view, CONFIG)
    sliced = decide(quality, busy.family(FAMILY), busy.memory_view, replace(CONFIG, queue_wait_time_sliced=True))
    assert q8.queue_seconds == next(c.queue_seconds for c in sliced.candidates if c.quantization == "Q8_0")
    assert q8.queue_seconds > next(c.queue_seconds for c in own.candidates if c.quantization == "Q8_0") + 5.0


def test_a_cold_start_late_on_its_prior_alone_is_tried_not_refused() -> None:
    """Nothing resident and every speed still a prior: Q4_K_M's load (4 s) and decode (0.6 s) overrun a 3 s
    deadline with no queue at all, within the policy's slack for priors. The fleet tries it, as a node router
    would: refused, a fleet whose first load a prior overrates would never load anything for such callers."""
    state = node(78, H100_TPS)
    cold = replace(state, candidates=tuple(replace(c, speed=replace(c.speed, measured=False))
                                           for c in state.candidates))
    decision = choose(request(Preference.LATENCY, time_remaining=3.0), {"a": cold}, CONFIG)
    assert decision.chosen is not None and decision.chosen.quantization == "Q4_K_M"
    assert decision.chosen.expected_seconds > 3.0 and decision.chosen.queue_seconds == 0 and decision.chosen.at_risk


@pytest.mark.parametrize("preference", list(Preference))
@pytest.mark.parametrize("nodes", [
    {"rtx4090": node(18, RTX4090_TPS), "h100": node(78, H100_TPS)},
    {"h100": node(78, H100_TPS, streams={"Q4_K_M": 30.0}), "rtx4090": node(18, RTX4090_TPS, resident=["Q4_K_M"])},
    {"a": node(78, H100_TPS, in_flight=4, max_in_flight=4), "b": node(7, H100_TPS)},  # b: only Q4_K_M fits
    {"a": node(78, H100_TPS, in_flight=4, max_in_flight=4)},  # nothing can serve
], ids=["idle", "queued", "at-limit", "none"])
def test_the_pair_picked_before_forwarding_is_the_one_the_later_explanation_names(
        preference: Preference, nodes: dict[str, NodeState]) -> None:
    """The fleet router forwards `pick`'s pair and explains it only once the node call has left: the explanation
    must name that very pair, with the numbers it was ranked on."""
    picked = pick(request(preference, time_remaining=20.0), nodes, CONFIG)
    explained = picked.explain()
    assert explained.chosen == picked.chosen and picked.explain() is explained  # built once
    if picked.chosen is not None:
        assert explained.node == picked.chosen.node and picked.chosen in explained.candidates
