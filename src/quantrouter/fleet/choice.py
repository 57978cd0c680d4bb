"""The fleet's decision: a pure function over (node, variant) candidates, built on `policy.decide`.

Each live node is decided on its own with its own memory, residency, speeds, per-variant load and
backlog (each stream's expected remaining seconds, as it reports them), exactly as its node router
would decide (so every change to the policy carries over, the queue, time-slicing and at-risk terms
included). The feasible pairs of those decisions are then ranked by the same preference and the policy's
own ranking, after one fleet-level charge: a node router cannot choose where a request goes, the fleet
can, so each pair's churn also carries what its decode costs the node's other streams. Runners of one GPU
time-slice it, so each stream on another runner finishes later by about min(its remaining seconds, this
decode); streams of the same runner run before it and lose nothing. Like churn, that is ranked on and
never counted against the deadline. A node at its in-flight limit offers nothing. No I/O, no clock,
no logging.

`pick` ranks and stops there: the fleet router forwards its pair at once, and the pair's explanation (every node's
own decision and listing, the fleet's reason) is built by `Pick.explain` once the node call has left. `choose` is
both at once. The pick alone takes 0.6–0.75× of the time the whole decision took on the path to the first token
(bench/results/fleet_choice.md, recorded 3- and 8-node states).

Every feasible (node, variant) pair is ranked, not only each node's own pick: a node router must serve
whatever arrives, so under load its policy buys speed with quality (BALANCED's deadline share holds only
while its GPU is quiet); the fleet can send the next caller elsewhere, and it prices what a pair costs
the node's other streams itself. Ranking only the nodes' picks left the fleet's BALANCED mix at Q4_K_M on
the busy node (bench/results/fleet.md's simulation, 4090+h100: 1.044× round-robin, the hindsight oracle
1.061×). Each pair keeps its node's own numbers and marks (at risk, held back, rejected).

QUALITY is ranked with the band of equal qualities a node router uses under load (`busy_quality_tolerance`)
while at least half the offering nodes are under load (`offered_load` > `quiet_load`): the fleet is then busy as
a node is, and its next callers land on the nodes still quiet. QUALITY ranks on quality alone, so the quiet band
put every QUALITY caller on F16, whose long decode then time-sliced beside the LATENCY callers' runners
(bench/results/fleet.md's simulation, 4090+h100: LATENCY SLO met 93.2 %, 1.047× round-robin; with the busy band
95.4 %, 1.053×). Half, not any: one loaded node among quiet ones leaves the fleet room for F16 (4xh100-shared
1.106× with any, 1.107× with half, 1.111× without; 20 seeds each). BALANCED keeps the quiet band: its score
already weighs speed, and the busy band there cost goodput (4090+h100 1.050× with it).

Three rules are the fleet's own. A request queued behind a runner's work is delayed by the other runners'
time-slicing through that whole wait (the policy's `queue_wait_time_sliced`, off for a node router, which has no
other node to send a LATENCY caller to). A node with a second's work queued for a runner's slot counts as overloaded
(`QUEUE_OVERLOAD_S`, the policy's `queue_overload_seconds`), whatever its recent rate: a burst fills the queues well
before it fills the load window, and meanwhile QUALITY and BALANCED callers started slower runners beside the queue,
which then time-sliced it past its callers' deadlines. And a request with a deadline that the fleet's pick would meet
alone but not behind its node's queue is refused up front (`FailureKind.DEADLINE`, answered DEADLINE_EXCEEDED): sent,
it would take GPU time until its deadline cancelled it, from callers who could still make theirs. Only the queue
refuses: a pick late on its own load and speed, which may be priors (`PRIOR_DEADLINE_SLACK`), is tried as a node
router tries it, or a fleet whose first load a prior overrates would never load: refusing every late pick on a node
router cost the single-node simulator 32 of 350 checks (6 seeds), the 70B's first loads among them. A node router
keeps trying queued ones too (the backlog only steers it): it has nowhere else to send them. In
bench/results/fleet.md's simulation (20 seeds), mixed-burst went from 1.002× round-robin to 1.041× with the last two
rules and to 1.058× with the first and the throughput table's line prior besides (4090+h100 1.052×, 4xh100-shared
1.107×). A node router's rule that the smallest variant serves an overload (the policy's `smallest_under_overload`)
is off here: these figures were measured without it, and it is untried across nodes.

An earlier version added each node's summed backlog to its pick's times after a decision made without
it: blind to time-slicing and to the deadline risk behind a queue, it sent QUALITY requests to F16
through a burst (bench/results/fleet.md's simulation, the mixed-burst scenario).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from quantrouter.fleet.state import NodeState
from quantrouter.policy import Appraisal, PolicyConfig, RoutingRequest, ranked_first_offer
from quantrouter.values import Assessment, Decision, FailureKind, Preference, quick_replacer

__all__ = ["QUEUE_OVERLOAD_S", "NodeVerdict", "Pick", "choose", "delay_to_others", "pick"]

# Seconds of work queued for a runner's slot from which a node counts as overloaded in the fleet's decisions
# (`PolicyConfig.queue_overload_seconds`). In the multi-node simulation (20 seeds × 3 scenarios) 0.3 s to 1 s gave
# the same goodput; 2 s and more let the queues grow for longer (mixed-burst 0.5 % lower at 2 s).
QUEUE_OVERLOAD_S = 1.0


@dataclass(frozen=True, slots=True)
class NodeVerdict:
    """One node's appraisal of the request; `limit` says why it offers nothing when it is at its limit."""

    node: str
    appraisal: Appraisal
    limit: str = ""

    @property
    def offers(self) -> bool:
        """Whether the node offers a pair the fleet ranks."""
        return not self.limit and self.appraisal.serves

    def decision(self) -> Decision:
        """The node's own decision, as its node router would make it (none chosen when at its limit)."""
        decision = self.appraisal.decision(self.node)
        if self.limit:
            return _decision(decision, chosen=None, reason=self.limit, failure=FailureKind.CONSTRAINTS)
        return decision


class Pick:
    """The pair the fleet ranks first (`chosen`, on `chosen.node`; None when no pair serves) and its explanation,
    built on the first call of `explain`: every node's listing, the reasons, the refusal. The fleet router forwards
    first and explains once the node call has left."""

    __slots__ = ("_decision", "_explain", "chosen")

    def __init__(self, chosen: Assessment | None, explain: Callable[[], Decision]) -> None:
        self.chosen = chosen
        self._explain = explain
        self._decision: Decision | None = None

    def explain(self) -> Decision:
        if self._decision is None:
            self._decision = self._explain()
        return self._decision


_decision = quick_replacer(Decision)
_request = quick_replacer(RoutingRequest)
_config = quick_replacer(PolicyConfig)


def _verdict(node: str, state: NodeState, request: RoutingRequest, excluded: frozenset[tuple[str, str]],
             config: PolicyConfig) -> NodeVerdict:
    failed = {tag for name, tag in excluded if name == node}
    own = _request(request, excluded=request.excluded | failed) if failed else request
    appraisal = Appraisal(own, state.family(request.family), state.memory_view, config)
    return NodeVerdict(node, appraisal, f"at its limit of {state.max_in_flight} streams" if state.at_limit else "")


def delay_to_others(state: NodeState, chosen: Assessment) -> float:
    """Seconds `chosen`'s decode adds, in all, to the node's streams on other runners: each stream is delayed
    by min(its remaining seconds, this decode); the variant's own streams (at most its queued seconds, each
    at most this decode) run before it and are left out."""
    return _delay(state, chosen.tag, chosen.expected_seconds - chosen.time_to_first_token)


def _delay(state: NodeState, tag: str, decode: float) -> float:
    if decode <= 0 or not state.backlog:
        return 0.0
    own = state.candidate(tag)
    behind = min(own.queued_seconds, own.in_flight * decode) if own else 0.0
    return max(sum(min(remaining, decode) for remaining in state.backlog) - behind, 0.0)


def _failure(decisions: list[Decision]) -> FailureKind:
    kinds = {d.failure for d in decisions}
    if kinds == {FailureKind.EMPTY}:
        return FailureKind.EMPTY
    if kinds <= {FailureKind.MEMORY, FailureKind.EMPTY}:
        return FailureKind.MEMORY
    return FailureKind.CONSTRAINTS


def _refused(request: RoutingRequest, reason: str, listed: tuple[Assessment, ...], excluded: frozenset[tuple[str, str]],
             failure: FailureKind, best_expected_seconds: float = 0.0) -> Decision:
    return Decision(request.family, request.preference, None, reason, listed, pinned=request.pinned_tag is not None,
                    fallback=bool(excluded), failure=failure, best_expected_seconds=best_expected_seconds)


def choose(request: RoutingRequest, nodes: Mapping[str, NodeState], config: PolicyConfig,
           excluded: frozenset[tuple[str, str]] = frozenset()) -> Decision:
    """The (node, variant) for `request` among the live `nodes`, explained; `excluded` holds pairs that failed
    already."""
    return pick(request, nodes, config, excluded).explain()


def pick(request: RoutingRequest, nodes: Mapping[str, NodeState], config: PolicyConfig,
         excluded: frozenset[tuple[str, str]] = frozenset()) -> Pick:
    """`choose`'s pair, its explanation left for later."""
    config = _config(config, queue_overload_seconds=config.queue_overload_seconds or QUEUE_OVERLOAD_S,
                     queue_wait_time_sliced=True, smallest_under_overload=0.0)
    verdicts = [_verdict(name, nodes[name], request, excluded, config) for name in sorted(nodes)]
    offering = [(v.node, v.appraisal) for v in verdicts if v.offers]
    if not offering:
        return Pick(None, lambda: _no_offer(request, verdicts, excluded))
    loaded = [nodes[node].offered_load > config.quiet_load for node, _ in offering]
    busy = request.preference is Preference.QUALITY and 2 * sum(loaded) >= len(loaded)
    ranking = _config(config, quality_tolerance=config.busy_quality_tolerance) if busy else config
    # The policy's own ranking, each pair's churn with what it costs its node's other streams.
    best = ranked_first_offer(offering, request.preference, ranking, request.time_remaining,
                              lambda node, tag, decode: _delay(nodes[node], tag, decode))
    assert best is not None  # some node offers a pair
    deadline = request.time_remaining
    if deadline is not None and best.expected_seconds > deadline >= best.expected_seconds - best.queue_seconds:
        return Pick(None, lambda: _refused(
            request, f"the fleet's pick for {request.family}, {best.tag} on node {best.node}, is expected to take "
            f"{best.expected_seconds:.2f} s, {best.queue_seconds:.1f} s of it queued behind other requests: past the "
            f"{deadline:.2f} s left before the deadline, so refused up front; retry with a longer deadline or when "
            "the fleet is less busy", _listed(v.decision() for v in verdicts), excluded, FailureKind.DEADLINE,
            best.expected_seconds))
    return Pick(best, lambda: _explained(request, verdicts, best, loaded if busy else [], excluded, config))


def _listed(decisions: Iterable[Decision]) -> tuple[Assessment, ...]:
    """Every node's candidates, in the nodes' order."""
    return tuple(a for d in decisions for a in d.candidates)


def _no_offer(request: RoutingRequest, verdicts: list[NodeVerdict], excluded: frozenset[tuple[str, str]]) -> Decision:
    decisions = [v.decision() for v in verdicts]
    why = "; ".join(f"node {v.node}: {d.reason}" for v, d in zip(verdicts, decisions, strict=True)) or "no live node"
    return _refused(request, f"no node can serve {request.family} ({why})", _listed(decisions), excluded,
                    _failure(decisions))


def _explained(request: RoutingRequest, verdicts: list[NodeVerdict], best: Assessment, loaded: list[bool],
               excluded: frozenset[tuple[str, str]], config: PolicyConfig) -> Decision:
    """The decision for `best`: its node's own, with the fleet's reason and every node's candidates; `loaded` says,
    when QUALITY was ranked with the busy band, which offering nodes were under load."""
    decisions = {v.node: v.decision() for v in verdicts}
    offers = [a for v in verdicts if v.offers for a in decisions[v.node].candidates if a.feasible]
    own_decision = decisions[best.node]
    own = own_decision.chosen
    reason = own_decision.reason
    if own is not None and own.tag != best.tag:
        reason = (f"{request.preference.value}: {best.tag} (quality {best.quality:.3f}, expected "
                  f"{best.expected_seconds:.2f} s) over the node's own pick {own.tag} (expected "
                  f"{own.expected_seconds:.2f} s): the fleet can send the next caller elsewhere")
    if loaded and best.quality < max(a.quality for a in offers) - config.quality_tolerance:
        reason += (f"; {sum(loaded)} of {len(loaded)} nodes under load (offered load > {config.quiet_load:g}): "
                   f"qualities within {config.busy_quality_tolerance:g} of the best count as equal, so the faster")
    if best.queue_seconds:
        reason += f"; {best.queue_seconds:.1f} s of queue on node {best.node}"
    others = best.churn_seconds - next(a.churn_seconds for a in own_decision.candidates if a.tag == best.tag)
    if others > 0:
        reason += f"; delays the node's other streams by {others:.1f} s in all (ranked as churn)"
    if (nodes_offering := sum(v.offers for v in verdicts)) > 1:
        reason += f"; node {best.node} ranked first of {nodes_offering} nodes"
    candidates = tuple(best if a.node == best.node and a.tag == best.tag else a for a in _listed(decisions.values()))
    return _decision(own_decision, chosen=best, reason=reason, candidates=candidates, fallback=bool(excluded),
                     downgraded=own_decision.downgraded and own is not None and own.tag == best.tag)
