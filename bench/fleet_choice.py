"""The fleet router's own CPU a request and a report: `fleet.choice.choose` and `fleet.state.read_report` timed on
states recorded from the multi-node simulator (bench/sim/fleet.py), 3 and 8 nodes.

A run of quantrouter-fleet over a busy trace records, at each arrival, the request and every node's state as
the fleet saw it, and each node's report as its router built it then; the two functions are then timed over
those recorded inputs (thread CPU time; `choose` over many calls after a warm-up, `read_report` once on each
report in the order they were sent, since the current tree keeps the variants it has read). `--baseline DIR`
also times the `choice.py` and `state.py` found in DIR (an older tree's copies) on the very same inputs, in the
same run, and checks that both choose the same (node, variant) with the same reason for every recorded request;
a `policy.py` there too is loaded first, for a `choice.py` whose import of it reads `from baseline_policy import`.
Where a tree's `choice.py` has `pick` (the pair alone, ranked before the request is forwarded; its explanation is
built once the node call has left), `pick` is timed too: it is the fleet's CPU on the path to the first token.
Prints its figures; `--write` also writes them to bench/results/fleet_choice.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from bench.machine import describe
from bench.sim.fleet import FleetSimulation, FleetView, NodeSpec, QuantrouterFleet, Routed, report_of, routing_request
from bench.sim.hardware import DEFAULT_ENGINE, GB, H100, LLAMA_8B, RTX_4090
from bench.sim.workload import Phase, Request, TenantProfile, generate_requests, generate_tenant, interactive_mix
from bench.stats import percentile
from quantrouter.fleet import choice, state
from quantrouter.fleet.state import NodeState
from quantrouter.policy import PolicyConfig, RoutingRequest
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.values import Decision

_T = TypeVar("_T")
RESULTS = Path(__file__).parent / "results" / "fleet_choice.md"
QUIET = TenantProfile(1 * int(GB), 3 * int(GB), (60.0, 180.0))
SHARED = TenantProfile(40 * int(GB), 76 * int(GB), (30.0, 90.0))
# Node sets: a 4090 beside two H100s (bench.fleet's mixed-burst nodes), and eight mixed GPUs, two of them shared.
FLEETS = {
    3: (("rtx4090", RTX_4090, QUIET), ("h100-a", H100, QUIET), ("h100-b", H100, QUIET)),
    8: (("rtx4090-a", RTX_4090, QUIET), ("rtx4090-b", RTX_4090, QUIET), ("h100-a", H100, QUIET),
        ("h100-b", H100, QUIET), ("h100-c", H100, QUIET), ("h100-d", H100, QUIET), ("h100-e", H100, SHARED),
        ("h100-f", H100, SHARED)),
}
# Requests per second per node: busy enough that most nodes hold streams (backlogs, streams, queues in the state).
RATE_PER_NODE = 0.4
DURATION_S = 300.0
WARMUP = 50


@dataclass(slots=True)
class Recorder:
    """quantrouter-fleet, recording each arrival's request, the states it chose over, and the nodes' reports."""

    inner: QuantrouterFleet = field(default_factory=QuantrouterFleet)
    picks: list[tuple[RoutingRequest, dict[str, NodeState]]] = field(default_factory=list)
    reports: list[pb.NodeCapacity] = field(default_factory=list)
    name: str = "recorder"
    reads_reports: bool = True

    def route(self, request: Request, view: FleetView) -> Routed:
        self.picks.append((routing_request(request, view.family, view.num_ctx), dict(view.reports)))
        self.reports.extend(report_of(sim.view(), node) for node, sim in sorted(view.truth.items()))
        return self.inner.route(request, view)


def record(nodes: int, seed: int) -> Recorder:
    rng = random.Random(f"fleet-choice/{nodes}/{seed}")
    requests = generate_requests(interactive_mix(1, 1), (Phase(0, RATE_PER_NODE * nodes),), DURATION_S, rng)
    specs = tuple(NodeSpec(name, gpu, generate_tenant(tenant, DURATION_S, rng)) for name, gpu, tenant in FLEETS[nodes])
    recorder = Recorder()
    FleetSimulation(specs, LLAMA_8B, requests, recorder, DEFAULT_ENGINE).run()
    return recorder


def cpu_us(call: Callable[[], object], rounds: int) -> list[float]:
    """Thread CPU time of each call, µs, after a warm-up."""
    for _ in range(WARMUP):
        call()
    samples = []
    for _ in range(rounds):
        start = time.thread_time_ns()
        call()
        samples.append((time.thread_time_ns() - start) / 1e3)
    return samples


def each_once(reports: Sequence[pb.NodeCapacity], module: ModuleType) -> list[float]:
    """Thread CPU time of `module.read_report` on each report once, in the order the nodes sent them, µs, starting
    with nothing read before (a tree that keeps variants it has read starts with none kept)."""
    known = getattr(module, "_known", None)
    if known is not None:
        known.clear()
    samples = []
    for report in reports:
        start = time.thread_time_ns()
        module.read_report(report)
        samples.append((time.thread_time_ns() - start) / 1e3)
    return samples


def summary(samples: Sequence[float]) -> str:
    return (f"p50 {percentile(samples, 0.5):7.1f} µs  p99 {percentile(samples, 0.99):7.1f} µs  "
            f"(n={len(samples)}, IQR {percentile(samples, 0.25):.1f}–{percentile(samples, 0.75):.1f})")


def over(inputs: Sequence[_T], call: Callable[[_T], object]) -> Callable[[], object]:
    """A call that takes the next recorded input each time, round the list."""
    position = iter(range(1 << 62))
    return lambda: call(inputs[next(position) % len(inputs)])


def load(directory: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", directory / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


def key(decision: Decision) -> tuple[object, ...]:
    chosen = decision.chosen
    return (decision.node, chosen, decision.reason, decision.candidates, decision.failure, decision.downgraded)


def _pick(choose: Callable[..., object], config: PolicyConfig, pick: tuple[RoutingRequest, dict[str, NodeState]]
          ) -> object:
    return choose(pick[0], pick[1], config)


def _fields(node: object) -> tuple[object, ...]:
    """A state's reported figures (both trees' `NodeState`s are compared, so not `==`, which wants one class)."""
    return tuple(getattr(node, f.name) for f in fields(node) if f.init)  # type: ignore[arg-type]


def _resent(report: pb.NodeCapacity) -> pb.NodeCapacity:
    again = pb.NodeCapacity()
    again.CopyFrom(report)
    again.sequence += 1
    return again


def _same(pair: tuple[pb.NodeCapacity, pb.NodeCapacity]) -> bool:
    return state.same_report(*pair)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_choice", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a directory holding older choice.py and state.py to compare")
    parser.add_argument("--baseline-label", help="what the baseline is, for the results file (default: its path)")
    parser.add_argument("--rounds", type=int, default=3000, help="timed calls per figure")
    parser.add_argument("--write", action="store_true", help=f"also write the figures to {RESULTS}")
    args = parser.parse_args(argv)
    arms: dict[str, tuple[ModuleType, ModuleType]] = {"this tree": (choice, state)}
    if args.baseline:
        if (args.baseline / "policy.py").exists():
            load(args.baseline, "policy")
        arms = {"baseline": (load(args.baseline, "choice"), load(args.baseline, "state")), **arms}
    config = PolicyConfig(runner_parallel=DEFAULT_ENGINE.num_parallel)
    lines = [f"Machine: {describe()}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Thread CPU time, µs.",
             f"Baseline: {args.baseline_label or args.baseline or 'none'}.", ""]

    def say(line: str) -> None:
        print(line)
        lines.append(line)

    for nodes in FLEETS:
        recorder = record(nodes, 0)
        picks = recorder.picks
        say(f"{nodes} nodes: {len(picks)} recorded picks, {len(recorder.reports)} recorded reports")
        decisions: dict[str, list[tuple[object, ...]]] = {}
        medians: dict[tuple[str, str], float] = {}
        for arm, (choice_module, state_module) in arms.items():
            choose = choice_module.choose
            decisions[arm] = [key(choose(r, s, config)) for r, s in picks]
            chose = cpu_us(over(picks, partial(_pick, choose, config)), args.rounds)
            read = each_once(recorder.reports, state_module)
            medians[arm, "choose"], medians[arm, "read_report"] = percentile(chose, 0.5), percentile(read, 0.5)
            say(f"  {arm:10s} choose       {summary(chose)}")
            if hasattr(choice_module, "pick"):
                paired = cpu_us(over(picks, partial(_pick, choice_module.pick, config)), args.rounds)
                medians[arm, "pick"] = percentile(paired, 0.5)
                say(f"  {arm:10s} pick         {summary(paired)}  (the pair alone, before forwarding)")
            say(f"  {arm:10s} read_report  {summary(read)}")
        twins = [(report, _resent(report)) for report in recorder.reports]
        unchanged = cpu_us(over(twins, _same), args.rounds)
        say(f"  {'this tree':10s} same_report  {summary(unchanged)}  (a report again, sequence number aside)")
        if args.baseline:
            for what in ("choose", "read_report"):
                ratio = medians["this tree", what] / medians["baseline", what]
                say(f"  {what} p50, this tree / baseline: {ratio:.2f}×")
            if ("this tree", "pick") in medians and ("baseline", "pick") not in medians:
                ratio = medians["this tree", "pick"] / medians["baseline", "choose"]
                say(f"  before forwarding, p50: this tree's pick / the baseline's choose: {ratio:.2f}×")
            older = arms["baseline"][1].read_report
            states = [(_fields(older(r)), _fields(state.read_report(r))) for r in recorder.reports]
            say(f"  same state read from each report as the baseline: {sum(a == b for a, b in states)}/{len(states)}")
            same = sum(a == b for a, b in zip(decisions["baseline"], decisions["this tree"], strict=True))
            say(f"  same decision (node, chosen assessment, reason, candidates) as the baseline: {same}/{len(picks)}")
            if same != len(picks) or any(a != b for a, b in states):
                raise SystemExit("decisions differ from the baseline")
        say("")
    if args.write:
        RESULTS.write_text(f"# Fleet choice and report reading\n\n{__doc__}\n```\n" + "\n".join(lines).rstrip()
                           + "\n```\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
