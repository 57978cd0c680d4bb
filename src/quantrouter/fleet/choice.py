"""The fleet's decision: a pure function over (node, variant) candidates, built on `policy.decide`.

Each live node is decided on its own with its own memory, residency, speeds and per-variant load,
exactly as its node router would decide (so every change to the policy carries over). The nodes'
chosen assessments are then ranked by the same preference, after one fleet-level adjustment: a node
already busy adds its backlog (the expected seconds still ahead of its streams, as it reports them)
to the time to first token and the expected time, as a queue in front of the new request would.
A node at its in-flight limit offers nothing. No I/O, no clock, no logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from quantrouter.fleet.state import NodeState
from quantrouter.policy import PolicyConfig, RoutingRequest, decide, rank
from quantrouter.values import Assessment, Decision, FailureKind

__all__ = ["NodeVerdict", "choose"]


@dataclass(frozen=True, slots=True)
class NodeVerdict:
    """One node's own decision, and its chosen assessment as the fleet ranks it (backlog included)."""

    node: str
    decision: Decision
    ranked: Assessment | None


def _with_node(node: str, decision: Decision) -> Decision:
    candidates = tuple(replace(a, node=node) for a in decision.candidates)
    chosen = replace(decision.chosen, node=node) if decision.chosen else None
    return replace(decision, candidates=candidates, chosen=chosen, node=node)


def _verdict(node: str, state: NodeState, request: RoutingRequest, excluded: frozenset[tuple[str, str]],
             config: PolicyConfig) -> NodeVerdict:
    own = replace(request, excluded=request.excluded | {tag for name, tag in excluded if name == node})
    decision = _with_node(node, decide(own, state.family(request.family), state.memory_view, config))
    if state.max_in_flight and state.in_flight >= state.max_in_flight:
        limit = f"at its limit of {state.max_in_flight} streams"
        return NodeVerdict(node, replace(decision, chosen=None, reason=limit, failure=FailureKind.CONSTRAINTS), None)
    chosen = decision.chosen
    if chosen is None:
        return NodeVerdict(node, decision, None)
    backlog = state.backlog_seconds
    return NodeVerdict(node, decision, replace(chosen, time_to_first_token=chosen.time_to_first_token + backlog,
                                               expected_seconds=chosen.expected_seconds + backlog))


def _failure(verdicts: list[NodeVerdict]) -> FailureKind:
    kinds = {v.decision.failure for v in verdicts}
    if kinds == {FailureKind.EMPTY}:
        return FailureKind.EMPTY
    if kinds <= {FailureKind.MEMORY, FailureKind.EMPTY}:
        return FailureKind.MEMORY
    return FailureKind.CONSTRAINTS


def choose(request: RoutingRequest, nodes: Mapping[str, NodeState], config: PolicyConfig,
           excluded: frozenset[tuple[str, str]] = frozenset()) -> Decision:
    """The (node, variant) for `request` among the live `nodes`; `excluded` holds pairs that failed already."""
    verdicts = [_verdict(name, nodes[name], request, excluded, config) for name in sorted(nodes)]
    offers = [v.ranked for v in verdicts if v.ranked is not None]
    listed = tuple(a for v in verdicts for a in v.decision.candidates)
    if not offers:
        why = "; ".join(f"node {v.node}: {v.decision.reason}" for v in verdicts) or "no live node"
        return Decision(request.family, request.preference, None, f"no node can serve {request.family} ({why})",
                        listed, pinned=request.pinned_tag is not None, fallback=bool(excluded),
                        failure=_failure(verdicts))
    best = rank(offers, request.preference, config, request.time_remaining)[0]  # the policy's own ranking
    verdict = next(v for v in verdicts if v.node == best.node)
    backlog = nodes[best.node].backlog_seconds
    reason = verdict.decision.reason
    if backlog:
        reason += f"; {backlog:.1f} s of work queued on node {best.node}"
    if len(offers) > 1:
        reason += f"; node {best.node} ranked first of {len(offers)} nodes"
    candidates = tuple(best if a.node == best.node and a.tag == best.tag else a for a in listed)
    return replace(verdict.decision, chosen=best, reason=reason, candidates=candidates, fallback=bool(excluded))
