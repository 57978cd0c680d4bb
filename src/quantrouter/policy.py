"""The routing decision: a pure function from plain values to an explainable `Decision`.

No I/O, no clock, no logging: the service passes in the catalog's variants, a memory view, the speed
estimates and the time left before the deadline. The model (design §5):

- memory needed = weights + the KV cache for num_ctx at `kv_bytes_per_element` (f16 unless the router is
  told Ollama's OLLAMA_KV_CACHE_TYPE: what the runner will hold), one slot's worth; a variant fits when it
  is resident (or loading: it has requests in flight, or the router started its load), or when need ≤
  `load_fraction` × (free − reserve + what idle variants of the same family would give back on eviction), where
  free memory that comes from the resident list (`STATIC_SOURCE`) also loses what variants still loading need:
  Ollama loads a model beside others only within 80 % of free memory and otherwise waits for busy runners to
  finish (docs/ollama.md §3), which a routed request would spend in a queue;
- queue = the GPU's backlog as this request would meet it: runners of one GPU time-slice it, so each
  in-flight request delays this one by min(its remaining seconds, this one's own service time) (remaining: no more
  than the time left before its deadline, when the router cancels it, `remaining`), and on a
  runner that already serves `runner_parallel` requests this one also waits its turn (with
  `queue_wait_time_sliced`, on a runner with one slot the other runners' time-slicing counts through that whole
  wait, not only through its own service); on one with a free slot
  it decodes in the same steps as its batch-mates, which do not time-slice it (their share, at most in-flight
  × its service, is taken off; counted, joining a busy runner's batch looked as slow as a second runner
  time-slicing the GPU with it, and LATENCY callers took that second runner, under which both runners' requests
  fell below 60 tok/s on the simulated H100 with OLLAMA_NUM_PARALLEL 2 and 4); a variant not loaded waits,
  when Ollama already holds `max_loaded` busy models, until the first of them drains;
- ttft = queue + cold-load time (when not resident) + prompt tokens / prompt tok/s;
- expected time T = ttft + num_predict / decode tok/s;
- churn = when loading a variant must evict an idle resident sibling (it does not fit beside it), the
  sibling's reload time, which its next users pay; ranked on (never counted against the deadline);
- quality = the candidate's quality (measured agreement where calibrated, else the quant prior);
  qualities within `quality_tolerance` of the best count as equal, so QUALITY takes the faster of equals;
  while the GPU is not quiet (`offered_load` > `quiet_load`) the band widens to `busy_quality_tolerance`.

QUALITY takes the highest quality (ties: smaller T + churn) and LATENCY the smallest T + churn (ties: higher quality),
except that with a deadline, while no runner of the family is busy, a cold load after which no sibling at or above
`SPEED_FLOOR_BPW` would fit beside it is ranked as BALANCED (deadline share aside): that runner serves every
preference until evicted. The simulator showed such a first pick setting the whole run (a 70B's Q6_K, a 32k-context
Q8_0 on 24 GB, kept for LATENCY callers whose deadline no reload fits), and the real-engine replay, whose memory
budget holds about one rung at a time, a LATENCY caller's Q4_0 and a QUALITY caller's F16 serving everyone.
BALANCED maximises w·q/q_max + (1−w)·C_min/C with C = T + churn, w =
`balanced_quality_weight`, where with a deadline, while the GPU is quiet (`offered_load` ≤ `quiet_load`),
a C within `balanced_deadline_share` of the time left counts as fast enough (so quality decides among those).

Constraints and the deadline reject first, judged on the variant alone (no backlog): when the deadline alone rules
every variant out the decision fails with `FailureKind.DEADLINE`. On a prior (no decode rate measured yet) the
deadline rejects only what it misses by more than `PRIOR_DEADLINE_SLACK`×: nearer, the candidate is tried
(`at_risk`), since a guessed speed or load time must not refuse what the engine can serve. The backlog only steers:
a candidate whose T, or whose decode stretched by the other busy runners time-slicing the GPU, passes the deadline,
or whose decode rate under that sharing falls below `min_tokens_per_second`, is `at_risk` and ranks after the rest
(when all are, the fastest is tried). Three more marks hold a candidate back behind the others (`held_back`, said
in words; `endangers` counts): its new runner would push in-flight requests past their deadline or rate floor
(runners time-slice the GPU, so a new one delays each by about min(its service, theirs left), `_Guard`); on a
shared GPU (`MemoryView.shared`) its load only fits by evicting idle siblings, whose memory other tenants may take
before it loads; or the GPU is overloaded (`offered_load`, the service seconds routed per second over the last
`LOAD_WINDOW_S`, or over the last `SURGE_WINDOW_S` ÷ `surge_factor` when that is higher, at or above
`overload_threshold`, or, where `queue_overload_seconds` is set, that much work queued behind the running streams)
and it is slower than the quickest warm variant (a busy runner: than the quickest that reads no more memory per
token, as its rate is measured in batches and beside other runners), or it is not the quickest of the quick warm
runners serving requests: one runner then serves the queue in order instead of several time-slicing runners that
all miss. With `smallest_under_overload` set, that one runner is the smallest variant at or above the speed floor
(warm, or cold where its load is repaid), and every other is held back. A fourth: its runner, not busy now and
slower than the quickest warm one, would make k runners time-slice the GPU, and serve long enough that
`tight_arrivals` callers whose SLO bears fewer than k are expected to arrive meanwhile (`MemoryView.tight_rates`,
by `runners_tolerated`, × its service): they would share the GPU with it for its whole decode (on the simulated
H100 8B with OLLAMA_NUM_PARALLEL 2 and 4, LATENCY callers arriving during a QUALITY caller's F16 decode fell under
their 60 tok/s floor). A variant below `SPEED_FLOOR_BPW` yields to any feasible variant at or above the floor that
is (or, unmeasured, is believed) at least as fast: below ~4.5 bits/weight dequantisation eats the smaller read
(docs/quantization.md §2 (iii)), so it serves when memory or an explicit constraint leaves nothing else. When
memory pressure rejects the variant the preference would have taken, the decision says `downgraded`. To keep Ollama
from loading and unloading in a thrash, a non-resident variant replaces a resident sibling only when it fits with a
margin (`upgrade_hysteresis`) to spare.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

from quantrouter.catalog import Architecture, VariantInfo
from quantrouter.quant import KV_CACHE_TYPES, QuantType
from quantrouter.throughput import SPEED_FLOOR_BPW, SpeedEstimate
from quantrouter.units import format_bytes
from quantrouter.values import Assessment, Decision, FailureKind, Preference, quick_constructor

__all__ = [
    "LOAD_WINDOW_S",
    "OLLAMA_MODELS_PER_GPU",
    "PRIOR_DEADLINE_SLACK",
    "SHARING_LEVELS",
    "SURGE_WINDOW_S",
    "Appraisal",
    "CandidateInput",
    "InFlight",
    "MemoryView",
    "PolicyConfig",
    "RoutingRequest",
    "decide",
    "offered_load",
    "queued_by_variant",
    "ranked_first_offer",
    "remaining",
    "remaining_seconds",
    "runners_tolerated",
]

# Ties within this relative margin count as equal, so the secondary key decides.
TIE_TOLERANCE = 1e-6
# Scores live in [0, 1]: a candidate at risk drops below every candidate that is not.
AT_RISK_PENALTY = 1.0
# When the architecture is unknown (no /api/show yet), assume the KV cache adds this share of the weights.
UNKNOWN_KV_SHARE = 0.1
# Ollama's scheduler loads beside other models only when the prediction ≤ 80 % of free memory
# (`server/sched.go` "Use 80% of free memory as threshold", docs/ollama.md §3).
OLLAMA_LOAD_FRACTION = 0.8
# Every decision builds an `Assessment` per candidate and a `Decision`: built without the frozen `__init__`'s cost.
_new_assessment = quick_constructor(Assessment)
_new_decision = quick_constructor(Decision)
# The window over which the router sums the service seconds it routed (`offered_load`): long enough to see a
# burst as a rate (30 s at 0.25 req/s holds ~7 arrivals), short enough to let go within a minute of its end.
LOAD_WINDOW_S = 30.0
# A burst shows first over this shorter window (`MemoryView.surge_load`): at its onset the 30 s window still
# averages the quiet before it, and QUALITY and BALANCED callers started F16 runners beside the burst's queue.
SURGE_WINDOW_S = 10.0
# A prior can be off by a good share (the bandwidth model's efficiency and the load prior's disk speed are
# guesses: the simulated 70B H100 loads in 15.7 s where the prior says 21 s): on a prior the deadline refuses only
# what it misses by more than this factor. Nearer, the candidate stays feasible (marked `at_risk`) and is tried.
PRIOR_DEADLINE_SLACK = 2.0
# `MemoryView.source` of a configured capacity (`memory.StaticSource`): free memory as `/api/ps` accounts for it.
STATIC_SOURCE = "static"
# OLLAMA_MAX_LOADED_MODELS unset (0) lets Ollama hold 3 models per GPU at once (docs/ollama.md, scheduler).
OLLAMA_MODELS_PER_GPU = 3
# Under overload, candidates within this share of the quickest warm variant's service count as as quick.
OVERLOAD_SPEED_SLACK = 0.05
# The runner counts `MemoryView.tight_rates` tells apart: callers whose SLO bears 1, 2, … this many runners
# time-slicing the GPU. A new runner makes at most max_loaded + 1 = 4 (Ollama holds 3 models per GPU by default).
SHARING_LEVELS = 4
# A routed request bears k runners time-slicing the GPU only with this share to spare on its SLO: its decode rate is
# an average over the batches its runner served, and the batch it meets may be bigger (on the simulated GPUs with
# OLLAMA_NUM_PARALLEL 2 and 4, LATENCY callers estimated at 2.2× their floor fell under it beside one other runner).
TIGHT_HEADROOM = 0.1


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    family: str
    preference: Preference = Preference.BALANCED
    pinned_tag: str | None = None
    prompt_tokens: int = 0
    num_predict: int = 256
    num_ctx: int = 4096
    min_quantization: QuantType | None = None
    allowed_quantizations: frozenset[str] = frozenset()
    min_tokens_per_second: float = 0.0
    max_time_to_first_token: float | None = None
    time_remaining: float | None = None
    excluded: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CandidateInput:
    """A variant with what the router knows of it right now."""

    variant: VariantInfo
    speed: SpeedEstimate
    quality: float
    in_flight: int = 0
    breaker_open: bool = False
    queued_seconds: float = 0.0  # expected remaining seconds of the requests this variant is serving
    quality_measured: bool = False  # `quality` is calibrate --quality's measurement, not the quant's prior
    loading: bool = False  # the router started its load, not yet listed resident (it may outlive its request)


@dataclass(frozen=True, slots=True)
class InFlight:
    """One in-flight request as a new runner's time-slicing would touch it: its decision's service estimate
    (alone on the GPU), the share of its tokens streamed, its variant's decode rate, and its SLO."""

    service_seconds: float
    done: float = 0.0
    tokens_per_second: float = 0.0
    time_left: float | None = None
    min_tokens_per_second: float = 0.0


@dataclass(frozen=True, slots=True)
class MemoryView:
    """The GPU as the router sees it: free memory and the backlog of its own in-flight requests.

    `backlog` holds each in-flight request's expected remaining seconds, sorted ascending
    (`remaining_seconds` builds it); `in_flight` the same requests with their SLOs; `offered_load` the service
    seconds routed per second lately (`offered_load()` builds it); `shared` whether other processes can take
    memory that an eviction frees (NVML's view of a GPU others use, not a static capacity of the router's own);
    `tight_rates` the requests routed per second lately that carried a deadline or a rate floor, by the most runners
    time-slicing the GPU their SLO bears (`runners_tolerated`): entry i counts those that bear i + 1 (the callers a
    new runner's time-slicing would reach while it serves, and whether it would hurt them); `surge_load` the offered
    load over the last `SURGE_WINDOW_S` only (`PolicyConfig.surge_factor`).
    """

    free_bytes: int
    reserve_bytes: int = 0
    source: str = "static"
    backlog: tuple[float, ...] = ()
    in_flight: tuple[InFlight, ...] = ()
    offered_load: float = 0.0
    shared: bool = False
    tight_rates: tuple[float, ...] = ()
    surge_load: float = 0.0


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The policy's knobs.

    `quality_tolerance`: qualities this close to the best count as equal. 0.005 is about the standard
    error of a top-1 agreement measured on a few thousand tokens (√(0.9·0.1/4000) ≈ 0.005), and below the
    smallest gap between neighbouring rungs of the prior (Q4_K_M 0.919 vs IQ4_XS 0.913).
    `runner_parallel`: OLLAMA_NUM_PARALLEL of the backend, the requests one runner serves at once.
    `balanced_deadline_share`: for BALANCED requests with a deadline, an expected time within this share of
    the time left counts as fast enough, so quality decides among such candidates; only while the offered load
    is at most `quiet_load`. Applied at any load, BALANCED took F16 often enough that the extra runner cost
    LATENCY callers 5 points of SLO met on the simulated H100 8B (0.25 req/s, 10 seeds) for 1 % more goodput;
    never applied, the idle GPU's goodput fell from 1.07× to 1.035× always-Q4_K_M (20 seeds).
    `kv_bytes_per_element`: the backend's KV cache element size (OLLAMA_KV_CACHE_TYPE, `quant.KV_CACHE_TYPES`).
    `overload_threshold`: the offered load (busy GPU seconds asked per second) from which the GPU counts as
    overloaded; 1.0 is where work arrives faster than one GPU serves it alone.
    `busy_quality_tolerance`: the band of equal qualities while the offered load is above `quiet_load`: a slower
    variant's runner time-slices the GPU for longer, and under load other callers' requests arrive meanwhile. At
    0.025 QUALITY takes Q8_0 (0.977) over F16 when Q8_0 is faster: on the simulated H100 8B at 0.25 req/s (20
    seeds × 7 engines) BALANCED SLO met rose by up to 0.7 point and, with half the QUALITY callers held to Q8_0
    or above, by 0.2–1.6 points, goodput at most 0.01× lower (up to 0.024× higher), the idle GPU's F16 untouched.
    `sole_runner_as_balanced`: a QUALITY or LATENCY request with a deadline, while no runner of the family is busy,
    whose pick is a cold load that would leave no room beside it for any sibling at or above the speed floor (it
    evicts whatever is loaded), is ranked as BALANCED (that runner serves every preference until evicted, and
    deadlines are the sign of callers who cannot wait out a reload; a deadline-free caller, batch work, keeps its
    preference's own pick). On the simulated 70B H100 and the 32k-context RTX 4090 the first request's pick
    otherwise set the whole run (20 seeds × 7 engines: their balanced and latency SLO misses and the 70B's goodput
    below 1.00× went). Applied then only to QUALITY on a GPU holding none of the family, it let the real-engine
    replay (a budget of about one rung) load F16 for a QUALITY caller beside a loaded Q4_K_M, evicting it, and
    start on Q4_0 for a LATENCY caller (3 % quicker than Q4_K_M by the calibration, measured quality 0.70 against
    0.95); each then served everyone. So extended, over six replay seeds quantrouter went from 0.97× to 1.00×
    always-Q4_K_M (bench/results/replay-sole-runner), and the simulator held the same 362 of 399 checks, no cell
    moving by 0.003. A GPU that serves QUALITY callers alone may turn it off.
    `max_loaded`: the models Ollama holds at once (OLLAMA_MAX_LOADED_MODELS, default 3 per GPU, docs/ollama.md);
    with that many loaded and all busy, a new variant's load waits for one to drain, which its queue counts;
    with one of them idle, the load evicts it: charged as churn and held back (on the simulated H100 8B, 6
    seeds × 7 engines, this moved balanced and latency SLO met within a point of always-Q4_K_M's in 4 more
    cells). Only this family's variants are counted (the decision sees no other family).
    `tight_arrivals`: a runner not busy now that is slower than the quickest warm one is held back when at least
    this many callers that its time-slicing would push past their deadline or rate floor are expected to arrive
    during its service (`MemoryView.tight_rates` of those whose SLO bears fewer runners than would share the GPU,
    × its service alone on the GPU): they would share the GPU with it for its whole decode, and `_Guard` protects
    only requests in flight at the decision. Off (0) by default. Charged on the rate of all such callers, without
    asking whether they would be hurt, it raised the simulator from 357 to 365 of 399 checks at 0.5, but the
    real-engine replay fell from 1.05× to 0.95× always-Q4_K_M: there every class met its SLO either way, and QUALITY
    callers only lost quality. With the harm test, at 0.2 (20 seeds × 63 cells) the latency class came closer to
    always-Q4_K_M on engines that batch (H100 8B with OLLAMA_NUM_PARALLEL 2 −7.5 → −4.3 points, 4 −7.8 → −3.6; RTX
    4090 8B / 2 −5.9 → −3.2) but within a point in only 2 more cells, and 359 checks held with 5 of the 357 lost
    (burst / 2 fell to 1.000×; the balanced class to −1.1 points in three constraints cells; QUALITY mean quality
    0.981 → 0.959 on the H100 8B / 2); at 0.5 (6 of the 9 scenarios) 3 gained and 2 lost. With the backlog capped
    at each stream's deadline and busy runners compared only with smaller siblings under overload, 0.2 holds 364
    checks against 362 (bench/results/simulation-tight-arrivals: 3 gained, 1 lost), and the replay of 2026-11-30
    (deadlines from a calibration made on a busy machine) fell from 1.05× to 0.99× (bench/results/replay-tight-arrivals:
    QUALITY callers lose quality, every class meets its SLO either way). What is left on those engines is mostly
    the batch: a LATENCY caller joins a busy runner's batch, whose cost the policy does not estimate (its
    batch-mates are taken not to slow it). A batch rate learned apart (samples whose runner served others at once)
    moved no check on 2026-12-01: the callers that miss join batches whose measured rate clears their floor
    (F16's 64 tok/s against 60), then slow further as others arrive.
    `queue_wait_time_sliced`: a request queued behind its runner's work (one slot per runner, OLLAMA_NUM_PARALLEL
    1) waits for all of it, and the other runners time-slice the GPU through that wait too: each of their requests
    delays it by min(its remaining seconds, the queue + its service), not by min(its remaining, its service). Off for
    a node router: the fuller estimate sent LATENCY callers to a second runner beside a busy one, and on the
    simulated H100 8B their SLO met fell from 0.5 to 1.8 points below always-Q4_K_M's (20 seeds). The fleet turns it
    on (`fleet.choice`): it has other nodes to send them to, and counted over their own service only, QUALITY callers
    queued behind a dozen seconds of work finished a third later than expected in the multi-node burst.
    `queue_overload_seconds`: work queued behind the runners' running streams (requests waiting for a slot) from
    which the GPU counts as overloaded whatever its recent rate: a burst fills the queues well before it fills
    `LOAD_WINDOW_S`. 0 turns it off; the fleet turns it on for its decisions (`fleet.choice.QUEUE_OVERLOAD_S`).
    `smallest_under_overload`: under overload the smallest variant at or above the speed floor serves the queue
    alone (`_smallest_under_overload`): decode reads its bytes per token, so it serves the most tokens per second,
    where the decode rates are no guide: a busy runner's are measured in its batches and beside other runners, its
    siblings' alone or as priors (on the simulated burst with OLLAMA_NUM_PARALLEL 4 a busy Q6_K's estimate fell from
    117 to 75 tok/s while Q4_K_M's prior stayed at 134: the quickest-warm rule kept Q6_K through the burst, and a
    switch ranked by rates chased one prior after another, each a new load). A cold one serves only when the GPU
    seconds it saves on the next `LOAD_WINDOW_S` of offered work are at least this many times its load seconds; 0,
    the default, turns the rule off (the fleet keeps it off whatever the setting: its figures were measured without
    it). On the simulator (20 seeds × 63 cells) 364 of 399 checks hold with it against 362, 2 gained and none lost
    (bench/results/simulation-smallest-under-overload); burst / OLLAMA_NUM_PARALLEL 4 itself falls from 0.972 to
    0.958× always-Q4_K_M: what the burst cells lose is runners started in the burst's first seconds, before the
    load reading shows it as overload. But on the real-engine replay (llama.cpp on this machine's CPU, where a load
    takes a fraction of a second and so always pays) it took quantrouter from 1.05× always-Q4_K_M (the three-seed
    replay of 2026-11-30) to 0.85× over the same seeds (bench/results/replay-smallest-under-overload):
    every SLO still met, but overloads served by the ladder's smallest rungs, of lower measured quality, with 13
    loads and 10 evictions against 6 and 3. So it is off by default.
    `surge_factor`: the decision reads the offered load as `MemoryView.surge_load` ÷ this when that is higher than
    `offered_load`: a burst shows within seconds over `SURGE_WINDOW_S`, the shorter window noisier, so it counts
    at a discount (0 turns it off; a fleet's node views carry no surge reading). On the simulator (20 seeds × 63
    cells) 362 of 399 checks held with it against 359 without, none lost, and the real-engine replay stayed at
    1.05× always-Q4_K_M; with `smallest_under_overload` too, 364 (6 seeds: 356 against 352); burst: QUALITY SLO
    met 81.1 → 82.0 %, goodput 1.012 → 1.016× always-Q4_K_M. At ÷ 1.5 the burst
    gained more (6 seeds: with OLLAMA_NUM_PARALLEL 4, 0.950 → 0.977×) but the H100 8B's balanced class lost its check
    under load jitter; read whole (÷ 1), the 10 s window lost 5 checks and steady traffic's goodput (RTX 4090 8B with
    OLLAMA_NUM_PARALLEL 4: 1.040 → 1.020×).
    """

    balanced_quality_weight: float = 0.5
    upgrade_hysteresis: float = 0.15
    load_fraction: float = OLLAMA_LOAD_FRACTION
    quality_tolerance: float = 0.005
    runner_parallel: int = 1
    balanced_deadline_share: float = 0.5
    quiet_load: float = 0.35
    busy_quality_tolerance: float = 0.025
    sole_runner_as_balanced: bool = True
    kv_bytes_per_element: float = KV_CACHE_TYPES["f16"]
    overload_threshold: float = 1.0
    max_loaded: int = OLLAMA_MODELS_PER_GPU
    tight_arrivals: float = 0.0
    queue_overload_seconds: float = 0.0
    queue_wait_time_sliced: bool = False
    smallest_under_overload: float = 0.0
    surge_factor: float = 2.0


def remaining(expected: float, done: float, time_left: float | None = None) -> float:
    """An in-flight request's expected remaining seconds: its service estimate times the share of its tokens still
    to come (the tokens streamed so far tell; wall time does not, as queued and time-sliced requests make no
    progress while it passes), and no more than the time left before its deadline: the router cancels the
    engine's request then, and a cancelled request leaves the engine's queue (its remaining work is never done)."""
    left = expected * max(1.0 - done, 0.0)
    return left if time_left is None else min(left, max(time_left, 0.0))


def remaining_seconds(streams: Sequence[tuple[float, float, float | None]]) -> tuple[float, ...]:
    """The backlog for `MemoryView`, sorted: each in-flight stream's `remaining` from its (service estimate, share
    streamed, seconds before its deadline or None)."""
    return tuple(sorted(remaining(*stream) for stream in streams))


def queued_by_variant(streams: Iterable[tuple[str, float]]) -> dict[str, float]:
    """`CandidateInput.queued_seconds` for each variant: the `remaining` seconds of the (variant, seconds) streams it
    serves, summed."""
    queued: dict[str, float] = {}
    for tag, left in streams:
        queued[tag] = queued.get(tag, 0.0) + left
    return queued


def runners_tolerated(chosen: Assessment, time_remaining: float | None, min_tokens_per_second: float) -> int:
    """The most runners time-slicing the GPU (its own among them) under which a routed request still meets its SLO,
    by its decision's own estimates: k runners stretch its decode k-fold, so its deadline holds while time to first
    token + k × decode ≤ the time left, and its rate floor while its decode rate ÷ k ≥ the floor, each with
    `TIGHT_HEADROOM` to spare. 0 when it is expected to miss even alone; `SHARING_LEVELS` + 1 stands for more."""
    bound = float(SHARING_LEVELS + 1)
    decode = chosen.expected_seconds - chosen.time_to_first_token
    if time_remaining is not None and decode > 0:
        bound = min(bound, (time_remaining - chosen.time_to_first_token) / (decode * (1 + TIGHT_HEADROOM)))
    if min_tokens_per_second > 0:
        bound = min(bound, chosen.tokens_per_second / (min_tokens_per_second * (1 + TIGHT_HEADROOM)))
    return max(int(bound), 0)


def offered_load(arrivals: Sequence[tuple[float, float]], now: float, window: float = LOAD_WINDOW_S) -> float:
    """`MemoryView.offered_load`: the service seconds of the requests routed within `window` before `now`
    ((time, service estimate) pairs), per second."""
    return sum(service for t, service in arrivals if now - window <= t <= now) / window


def _constraint_rejection(c: CandidateInput, request: RoutingRequest, speed: SpeedEstimate, ttft: float) -> str:
    quant = c.variant.quant
    floor = request.min_quantization
    if request.excluded and c.variant.tag in request.excluded:
        return "failed before its first token on this request"
    if c.breaker_open:
        return "skipped for a cool-down after repeated failures"
    if floor is not None and quant.quality < floor.quality:
        return f"below min_quantization {floor.name}"
    if request.allowed_quantizations and quant.name not in request.allowed_quantizations:
        return f"{quant.name} is not among the allowed quantizations"
    if request.min_tokens_per_second and speed.decode_tps < request.min_tokens_per_second:
        return f"{speed.decode_tps:.1f} tok/s is below min_tokens_per_second {request.min_tokens_per_second:g}"
    if request.max_time_to_first_token is not None and ttft > request.max_time_to_first_token:
        return f"time to first token {ttft:.2f} s exceeds max_time_to_first_token " \
               f"{request.max_time_to_first_token:.2f} s"
    return ""


class _Backlog:
    """Σ min(remaining_j, s) over the in-flight requests, in O(log n) per candidate."""

    __slots__ = ("_prefix", "_sorted")

    def __init__(self, remaining: tuple[float, ...]) -> None:
        self._sorted = remaining
        self._prefix = (0.0, *accumulate(remaining))

    def delay(self, service: float) -> float:
        i = bisect_left(self._sorted, service)
        return self._prefix[i] + service * (len(self._sorted) - i)


class _Guard:
    """How many in-flight requests a new busy runner would push past their SLO, in O(log n) per candidate.

    With k runners busy, request j expects to finish in k × its remaining seconds r; a new runner delays it by
    about min(s, r), s the newcomer's service. Its slack t is the time left to its deadline beyond that, or the
    decode time its rate floor allows beyond k × its service; a request with 0 ≤ t < r is endangered by any
    s > t (one with t < 0 misses already, one with t ≥ r cannot be pushed past).
    """

    __slots__ = ("_slacks",)

    def __init__(self, in_flight: Sequence[InFlight], busy_runners: int) -> None:
        k = max(busy_runners, 1)
        slacks = []
        for j in in_flight:
            left = j.service_seconds * max(1.0 - j.done, 0.0)
            tight = left
            if j.time_left is not None and 0 <= (t := j.time_left - left * k) < tight:
                tight = t
            if j.min_tokens_per_second > 0 and 0 <= (
                    t := j.service_seconds * (j.tokens_per_second / j.min_tokens_per_second - k)) < tight:
                tight = t
            if tight < left:
                slacks.append(tight)
        self._slacks = sorted(slacks)

    def endangered(self, service: float) -> int:
        return bisect_left(self._slacks, service)


class _Frame:
    """What every candidate of one decision shares, worked out once: the request's numbers, the memory
    thresholds, the backlog, and the context bytes per architecture (KV cache + compute graph).

    The KV cache is counted for one slot although Ollama gives a runner num_ctx × OLLAMA_NUM_PARALLEL: with
    every slot counted the simulator's long-prompts / parallel-4 cell had no variant left that fits within
    `load_fraction`, and the router refused everything that Ollama, whose first model always loads, serves.
    """

    __slots__ = ("_kv", "available", "backlog", "busy_runners", "config", "constrained", "deadline", "decode_tokens",
                 "family_resident", "guard", "load_wait", "min_tps", "prompt_tokens", "request", "upgrade_usable",
                 "usable", "vetted")

    def __init__(self, request: RoutingRequest, available: int, family_resident: bool, backlog: _Backlog,
                 busy_runners: int, guard: _Guard, load_wait: float, config: PolicyConfig) -> None:
        self.request, self.config, self.backlog, self.busy_runners = request, config, backlog, busy_runners
        self.guard, self.load_wait = guard, load_wait
        self.prompt_tokens, self.decode_tokens = request.prompt_tokens, request.num_predict
        self.deadline, self.min_tps = request.time_remaining, request.min_tokens_per_second
        # Whether the request sets any constraint `_constraint_rejection` judges (most set none).
        self.constrained = bool(request.excluded or request.min_quantization is not None
                                or request.allowed_quantizations or request.min_tokens_per_second
                                or request.max_time_to_first_token is not None)
        self.family_resident = family_resident
        # Memory limits apply only to loads the policy chooses (a pinned tag is served as asked).
        self.vetted = request.pinned_tag is None
        self._set_available(available)
        self._kv: dict[int, int] = {}

    def _set_available(self, available: int) -> None:
        self.available = available
        self.usable = available * self.config.load_fraction
        self.upgrade_usable = self.usable / (1 + self.config.upgrade_hysteresis)

    def take(self, held: int) -> None:
        """Count `held` bytes as gone from the memory available to a load."""
        if held:
            self._set_available(self.available - held)

    def need(self, variant: VariantInfo) -> int:
        arch, element = variant.architecture, self.config.kv_bytes_per_element
        if arch is None:
            return int(variant.size_bytes * (1 + UNKNOWN_KV_SHARE * element / KV_CACHE_TYPES["f16"]))
        kv = self._kv.get(id(arch))
        if kv is None:
            kv = self._kv[id(arch)] = _context_bytes(arch, self.request.num_ctx, element)
        return variant.size_bytes + kv


@lru_cache(maxsize=256)
def _context_bytes(arch: Architecture, num_ctx: int, element: float) -> int:
    """KV cache + compute graph, remembered across decisions: a few architectures and contexts come back on every
    request, where `_Frame`'s cache (by identity, cheaper than hashing) lasts one decision. A fleet decides once per
    node, and each decision would work it out again."""
    return arch.kv_cache_bytes(num_ctx, element) + arch.graph_bytes(num_ctx)


class _Row:
    """A candidate's numbers while the decision is made (mutable, so each `Assessment` is built once)."""

    __slots__ = ("at_risk", "below_floor", "churn", "deadline_only", "endangers", "expected", "held_back", "measured",
                 "memory_only",
                 "need", "quality", "quality_measured", "quantization", "queue", "rejection", "resident", "score",
                 "service", "tag", "takes_slot", "tier", "tps", "ttft")

    def __init__(self, c: CandidateInput, frame: _Frame) -> None:
        v, speed, config = c.variant, c.speed, frame.config
        # A variant with requests in flight has its runner loaded or loading (Ollama's /api/ps lists it only once
        # loaded): its memory is already gone from free and its load already under way, in those requests' time;
        # so has one whose load the router started and that outlived its request (`loading`).
        quant, resident, tps = v.quant, v.resident or c.in_flight > 0 or c.loading, speed.decode_tps
        self.tag, self.quantization, self.resident = v.tag, quant.name, resident
        self.tps, self.measured, self.quality = tps, speed.measured, c.quality
        self.quality_measured = c.quality_measured
        self.below_floor = quant.bits_per_weight < SPEED_FLOOR_BPW
        self.need = need = frame.need(v)
        load = 0.0 if resident else speed.load_seconds
        prefill = frame.prompt_tokens / speed.prompt_tps
        decode = frame.decode_tokens / tps
        self.service = service = prefill + decode
        queue = frame.backlog.delay(service)
        if not resident:
            queue += frame.load_wait
        in_flight = c.in_flight
        if in_flight >= config.runner_parallel:
            queue += max(c.queued_seconds - in_flight * service, 0.0)
            if config.runner_parallel == 1 and config.queue_wait_time_sliced:
                queue = max(queue, frame.backlog.delay(c.queued_seconds + service))
        elif in_flight:  # a free slot in its batch: its batch-mates decode in its steps, not time-sliced
            queue = max(queue - min(c.queued_seconds, in_flight * service), 0.0)
        # Constraints judge the variant on its own (alone on the GPU); the backlog only steers (`at_risk`).
        constrained = frame.constrained or c.breaker_open
        rejection = _constraint_rejection(c, frame.request, speed, load + prefill) if constrained else ""
        deadline = frame.deadline
        # The deadline is the last constraint judged: a variant it alone rules out counts for FailureKind.DEADLINE.
        self.deadline_only = (not rejection and deadline is not None
                              and load + service > (deadline if speed.measured else deadline * PRIOR_DEADLINE_SLACK))
        if self.deadline_only:
            rejection = f"expected {load + service:.2f} s exceeds the {deadline:.2f} s left before the deadline"
        memory_only = False
        if not rejection and not resident and frame.vetted:
            if need > frame.usable:
                rejection = (f"needs {format_bytes(need)}, {format_bytes(max(frame.available, 0))} free "
                             f"(Ollama loads within {config.load_fraction:.0%} of it)")
                memory_only = True
            elif frame.family_resident and need > frame.upgrade_usable:
                rejection = (f"needs {format_bytes(need)} of {format_bytes(frame.available)} free: within the "
                             f"{config.upgrade_hysteresis:.0%} margin kept before replacing a resident sibling")
                memory_only = True
        self.rejection, self.memory_only = rejection, memory_only
        self.queue, self.churn, self.score = queue, 0.0, 0.0
        self.ttft = ttft = queue + load + prefill
        self.expected = expected = ttft + decode
        # Its decode rate while other runners time-slice the GPU (its own runner's queue delays, never slows it).
        sharing = 1 + frame.busy_runners - (in_flight > 0)
        late = deadline is not None and max(expected, ttft + decode * sharing) > deadline
        self.at_risk = late or tps / sharing < frame.min_tps
        # Only a runner that is idle now adds one more to time-slice the GPU.
        self.endangers = frame.guard.endangered(service) if in_flight == 0 and frame.busy_runners else 0
        self.held_back = (f"its new runner would push {self.endangers} in-flight request(s) past their SLO"
                          if self.endangers else "")
        self.tier = 0
        self.takes_slot = False

    def assessment(self, node: str) -> Assessment:
        # Positional, in `Assessment`'s field order (keywords cost a dict per call).
        return _new_assessment(self.tag, self.quantization, self.need, self.resident, self.tps, self.measured,
                               self.ttft, self.expected, self.quality, self.score, self.rejection, self.memory_only,
                               node, self.queue, self.churn, self.at_risk, self.quality_measured, self.endangers,
                               self.held_back)

    def charged(self, churn: float) -> _Row:
        """A copy with `churn` seconds more churn, for a ranking beside other pools (the row itself stays as its
        own pool's ranking needs it)."""
        row = _Row.__new__(_Row)
        for name in _Row.__slots__:
            setattr(row, name, getattr(self, name))
        row.churn += churn
        return row


def _load(memory: MemoryView, config: PolicyConfig) -> float:
    """The offered load the decision reads: `offered_load`, or the surge reading (`surge_load` ÷ `surge_factor`)
    when that is higher."""
    if config.surge_factor and (surge := memory.surge_load / config.surge_factor) > memory.offered_load:
        return surge
    return memory.offered_load


def _load_text(memory: MemoryView, config: PolicyConfig) -> str:
    """`_load` in words, written only where a reason shows it (not on every decision's path)."""
    load = _load(memory, config)
    if load > memory.offered_load:
        return f"offered load {load:.2f} ({memory.surge_load:.2f} over the last {SURGE_WINDOW_S:g} s ÷ " \
               f"{config.surge_factor:g})"
    return f"offered load {load:.2f}"


def _charge_churn(rows: Sequence[_Row], pool: Sequence[CandidateInput], free: int, config: PolicyConfig) -> None:
    """A load that only fits by evicting idle resident siblings costs their next users a reload; so does one
    that finds Ollama holding `max_loaded` models already (it evicts an idle one: the quickest to reload is
    charged, whichever Ollama picks)."""
    idle = [c.speed.load_seconds for c in pool if c.variant.resident and c.in_flight == 0]
    if not idle:
        return
    reload = sum(idle)
    full = sum(row.resident for row in rows) >= config.max_loaded  # loaded, or loading (`_Row.resident`)
    usable = free * config.load_fraction
    for row in rows:
        if not row.rejection and not row.resident:
            if row.need > usable:
                row.churn = reload
            elif full:
                row.churn, row.takes_slot = min(idle), True


def _hold_back(rows: Sequence[_Row], pool: Sequence[CandidateInput], memory: MemoryView, queued: float,
               config: PolicyConfig) -> None:
    """Mark what should serve only when nothing else safe can: a load that takes an idle sibling's place among
    the `max_loaded` models Ollama holds; on a shared GPU, loads that evict idle siblings for memory (other
    tenants may take the memory they free before the load is done); and under overload anything slower than
    the quickest warm variant (a busy runner: the quickest that reads no more memory per token, `_quickest_beside`),
    or, while quick warm runners serve requests, every variant but the quickest of those (another runner only
    time-slices the GPU with it: no more throughput, and every queued request later).
    Overloaded: the offered load the decision reads (`_load`) at or above `overload_threshold`, or `queued` seconds
    of work waiting for a slot at or above `queue_overload_seconds` (when set)."""
    feasible = [row for row in rows if not row.rejection]
    quickest = 0.0
    lead: _Row | None = None
    smallest: _Row | None = None
    serves = ""
    queue_limit = config.queue_overload_seconds
    if (load := _load(memory, config)) >= config.overload_threshold:
        overload = f"{_load_text(memory, config)} ≥ {config.overload_threshold:g}"
    elif queue_limit and queued >= queue_limit:
        overload = f"{queued:.1f} s of work queued for a slot ≥ {queue_limit:g} s"
    else:
        overload = ""
    beside: dict[_Row, float] = {}  # each busy runner's bar for counting as quick (`_quickest_beside`)
    if overload and feasible:
        warm = [row for row in feasible if row.resident] or feasible
        quickest = min(row.service for row in warm) * (1 + OVERLOAD_SPEED_SLACK)
        beside = {row: _quickest_beside(row, warm) for row, c in zip(rows, pool, strict=True)
                  if c.in_flight and not row.rejection}
        lead = min((row for row in feasible if row in beside and row.service <= beside[row]),
                   key=lambda row: row.service, default=None)
        smallest, serves = _smallest_under_overload(feasible, pool, rows, load, config)
    shared = memory.shared
    evicting = any(row.churn and (shared or row.takes_slot) for row in feasible)
    if not quickest and not evicting:  # nothing to add to what the in-flight guard said
        return
    for row in feasible:
        reasons = [row.held_back] if row.held_back else []
        if row.churn and row.takes_slot:
            reasons.append(f"its load takes an idle sibling's place (Ollama holds {config.max_loaded} models at "
                           "most), whose next users reload it")
        elif row.churn and shared:
            reasons.append("its load evicts idle siblings, whose memory other tenants may take first")
        if smallest is not None:
            if row is not smallest:
                reasons.append(f"{overload}: {serves}")
        elif quickest and row.service > beside.get(row, quickest):
            reasons.append(f"{overload}: slower than the quickest warm variant")
        elif lead is not None and row is not lead:
            reasons.append(f"{overload}: its runner would time-slice the GPU with {lead.tag}'s, which serves the "
                           "queue in order")
        row.held_back = "; ".join(reasons)


def _quickest_beside(busy: _Row, warm: Sequence[_Row]) -> float:
    """The service time under which a busy runner counts as quick under overload: within the slack of the quickest
    warm variant that reads no more memory per token. Its rate is measured in batches (OLLAMA_NUM_PARALLEL) and
    beside other runners, a larger idle sibling's alone or as a prior, so that sibling only looks quicker (on the
    simulated H100 with OLLAMA_NUM_PARALLEL 4, a burst's batches on Q6_K read 93 tok/s against Q8_0's 106 alone,
    and Q8_0's runner was started to time-slice the GPU beside the queue)."""
    return min((row.service for row in warm if row.need <= busy.need), default=busy.service) * (
        1 + OVERLOAD_SPEED_SLACK)


def _smallest_under_overload(feasible: Sequence[_Row], pool: Sequence[CandidateInput], rows: Sequence[_Row],
                             load: float, config: PolicyConfig) -> tuple[_Row | None, str]:
    """Under overload, the variant that serves the queue when `smallest_under_overload` is set: the feasible one
    with the least memory need at or above the speed floor (decode reads its bytes per token, so it serves the
    most tokens per second), and why. Decode rates do not rank it: a busy runner's are measured in batches and
    beside other runners, its idle siblings' alone or as priors. A cold one serves only when its load is repaid:
    the GPU seconds its smaller read saves on the next `LOAD_WINDOW_S` of offered work, next to the smallest warm
    variant's, are at least `smallest_under_overload` × its load seconds. (None, "") when no variant serves so."""
    if not config.smallest_under_overload:
        return None, ""
    best = min((row for row in feasible if not row.below_floor), key=lambda row: row.need, default=None)
    if best is None:
        return None, ""
    serves = f"{best.tag} serves the queue, the variant with the least memory to read per token"
    if best.resident:
        return best, serves
    warm = min((row.need for row in feasible if row.resident), default=best.need)
    load_seconds = pool[rows.index(best)].speed.load_seconds
    saved = load * LOAD_WINDOW_S * (1 - best.need / warm)
    if saved < load_seconds * config.smallest_under_overload:
        return None, ""
    return best, (f"{serves}; its {load_seconds:.1f} s load repaid by the {saved:.1f} GPU seconds it saves on the "
                  f"next {LOAD_WINDOW_S:g} s of offered work")


def _hold_back_for_arrivals(rows: Sequence[_Row], pool: Sequence[CandidateInput], tight_rates: tuple[float, ...],
                            busy_runners: int, config: PolicyConfig) -> None:
    """Hold back a runner not busy now that would hurt callers with a deadline or a rate floor expected to arrive
    while it serves, unless it is warm and as quick as the quickest warm runner, or cold and quicker. The harm
    test: those callers go to the quickest warm runner, which would time-slice the GPU with the busy runners and
    the newcomer's, k in all; the callers whose SLO bears fewer than k (`tight_rates`, by `runners_tolerated`)
    would miss it, and the newcomer is held back when `tight_arrivals` of them are expected during its service.
    Batch-mates on one runner are not counted: they decode in its steps (the policy has no estimate of what a batch
    costs each of them). A cold sibling only as quick is held back too (its new runner time-slices all the same:
    exempted, QUALITY callers took a cold Q5_K_M beside a warm Q4_K_M, and burst / OLLAMA_NUM_PARALLEL 2 lost
    0.005× more goodput)."""
    if not config.tight_arrivals or not any(tight_rates):
        return
    warm = [(row, c) for row, c in zip(rows, pool, strict=True) if row.resident and not c.breaker_open]
    if not warm:
        return
    quickest, serving = min(warm, key=lambda pair: pair[0].service)
    quick = quickest.service
    sharing = busy_runners + (serving.in_flight == 0) + 1
    harmed = sum(tight_rates[:sharing - 1])
    if not harmed:
        return
    for row, c in zip(rows, pool, strict=True):
        # A warm runner within the slack of the quickest serves those callers as well; a cold one must be quicker.
        quicker = (row.service <= quick * (1 + OVERLOAD_SPEED_SLACK) if row.resident
                   else row.service * (1 + OVERLOAD_SPEED_SLACK) < quick)
        if row.rejection or c.in_flight or quicker:
            continue
        expected = harmed * row.service
        if expected >= config.tight_arrivals:
            why = (f"its runner would make {sharing} time-slicing the GPU with {quickest.tag}'s, which serves callers "
                   f"with an SLO: {expected:.1f} whose SLO bears at most {sharing - 1} ({harmed:.2f}/s lately) "
                   f"expected during its {row.service:.1f} s")
            row.held_back = f"{row.held_back}; {why}" if row.held_back else why


def _hold_back_sub_floor(rows: Sequence[_Row]) -> None:
    """Variants below the speed floor yield to any feasible variant at or above it that is (or is believed)
    at least as fast: they serve when memory or an explicit constraint leaves nothing else."""
    if not any(row.below_floor for row in rows):
        return
    fastest = max((row.tps for row in rows if not row.rejection and not row.below_floor), default=None)
    if fastest is None:
        return
    for row in rows:
        if row.below_floor and not row.rejection and (not row.measured or row.tps <= fastest):
            row.rejection = (f"below {SPEED_FLOOR_BPW:g} bits/weight and no faster than a variant above it "
                             "(dequantisation): kept for memory pressure")


def _best(rows: Sequence[_Row], preference: Preference, config: PolicyConfig, time_remaining: float | None,
          tolerance: float) -> _Row | None:
    """The row that ranks first (the earliest of equals), each row's score set (higher is better). A candidate at
    risk of missing the deadline or the speed floor behind the GPU's backlog, and one held back, each score
    `AT_RISK_PENALTY` lower, so they rank after the rest. Ties within `TIE_TOLERANCE` go to the other objective:
    quality for LATENCY, the cost T + churn (then quality) for the others."""
    if not rows:
        return None
    low = 2
    for row in rows:
        row.tier = tier = row.at_risk + (row.held_back != "")
        if tier < low:
            low = tier
    if low:  # nothing is expected to make it cleanly: the fastest has the best chance
        preference = Preference.LATENCY
    # BALANCED with a deadline: finishing within `balanced_deadline_share` of the time left is fast enough.
    enough = (config.balanced_deadline_share * time_remaining
              if preference is Preference.BALANCED and time_remaining is not None else 0.0)
    top_q = 0.0
    best_c = float("inf")
    for row in rows:
        if row.tier == low:
            if row.quality > top_q:
                top_q = row.quality
            cost = row.expected + row.churn
            if cost < best_c:
                best_c = cost
    if best_c < enough:
        best_c = enough
    floor_q = top_q - tolerance
    best_q = top_q or 1.0
    weight = config.balanced_quality_weight
    by_quality, by_speed = preference is Preference.QUALITY, preference is Preference.LATENCY
    best: _Row | None = None
    best_key: tuple[float | str, ...] = ()
    for row in rows:
        cost = row.expected + row.churn
        if cost < enough:
            cost = enough
        speed = (best_c / cost if best_c < cost else 1.0) if cost > 0 else 1.0
        quality = top_q if row.quality >= floor_q else row.quality
        if by_quality:
            value = quality
        elif by_speed:
            value = speed
        else:
            value = weight * quality / best_q + (1 - weight) * speed
        row.score = value = value - AT_RISK_PENALTY * row.tier
        tied = -round(value / TIE_TOLERANCE)
        key = (tied, -row.quality, row.tag) if by_speed else (tied, row.expected + row.churn, -row.quality, row.tag)
        if best is None or key < best_key:
            best, best_key = row, key
    return best


def ranked_first_offer(appraisals: Sequence[tuple[str, Appraisal]], preference: Preference, config: PolicyConfig,
                       time_remaining: float | None, churn: Callable[[str, str, float], float]) -> Assessment | None:
    """The candidate that can serve which the policy's own ranking puts first among several appraisals' (a fleet's
    nodes, each named), its score set. `churn(node, tag, decode seconds)` is what a candidate costs beyond its own
    pool, added to its churn (the fleet: what its decode delays its node's other streams). Ranked on the appraisals'
    own rows: nothing is built for the candidates that lose."""
    rows: list[_Row] = []
    nodes: list[str] = []
    for node, appraisal in appraisals:
        for row in appraisal._rows:
            if not row.rejection:
                extra = churn(node, row.tag, row.expected - row.ttft)
                rows.append(row.charged(extra) if extra else row)
                nodes.append(node)
    best = _best(rows, preference, config, time_remaining, config.quality_tolerance)
    return None if best is None else best.assessment(nodes[rows.index(best)])


class Appraisal:
    """`request` judged against one pool of candidates (the family's variants): every candidate's numbers, the
    constraints and hold-backs applied, not yet ranked or explained. A node router ranks and explains at once
    (`decide`). A fleet router appraises every node's pool, ranks their candidates together, and builds the
    decision, every node's listing and reason included, only once the call to the node it picked has left
    (`ranked_first_offer`, `fleet.choice.pick`)."""

    __slots__ = ("_frame", "_memory", "_rows")

    def __init__(self, request: RoutingRequest, candidates: Sequence[CandidateInput], memory: MemoryView,
                 config: PolicyConfig = PolicyConfig()) -> None:
        pool = [c for c in candidates if request.pinned_tag in (None, c.variant.tag)]
        # One pass over the pool: the memory idle residents would give back on eviction; with Ollama holding
        # `max_loaded` models all busy, when a new runner could load (once the shortest backlog drains,
        # time-sliced by the busy runners); and the work waiting for a runner's slot.
        reclaimable = busy_runners = idle_loaded = 0
        family_resident = False
        drain = waiting = 0.0
        parallel = config.runner_parallel
        for c in pool:
            resident = c.variant.resident
            family_resident = family_resident or resident
            if in_flight := c.in_flight:
                drain = c.queued_seconds if not busy_runners or c.queued_seconds < drain else drain
                busy_runners += 1
                if in_flight > parallel:  # the share of its work waiting for a slot
                    waiting += c.queued_seconds * (in_flight - parallel) / in_flight
            elif resident:
                idle_loaded += 1
                reclaimable += c.variant.vram_bytes
        free = memory.free_bytes - memory.reserve_bytes
        load_wait = drain * busy_runners if busy_runners >= config.max_loaded and not idle_loaded else 0.0
        frame = _Frame(request, free + reclaimable, family_resident, _Backlog(memory.backlog), busy_runners,
                       _Guard(memory.in_flight, busy_runners), load_wait, config)
        if memory.source == STATIC_SOURCE:
            # A configured capacity counts what `/api/ps` lists, and it lists a model only once loaded: a variant
            # the router is loading (requests in flight, or a load it started) still reads as free memory. On the
            # real-engine replay F16 was picked beside a Q4_K_M still loading, and the backend evicted Q4_K_M.
            frame.take(sum(frame.need(c.variant) for c in pool
                           if (c.in_flight or c.loading) and not c.variant.resident))
        rows = [_Row(c, frame) for c in pool]
        if pool and request.pinned_tag is None:
            _charge_churn(rows, pool, free, config)
            _hold_back_sub_floor(rows)
            _hold_back(rows, pool, memory, waiting, config)
            _hold_back_for_arrivals(rows, pool, memory.tight_rates, busy_runners, config)
        self._frame, self._memory, self._rows = frame, memory, rows

    @property
    def serves(self) -> bool:
        """Whether any candidate can serve."""
        return any(not row.rejection for row in self._rows)

    def decision(self, node: str = "") -> Decision:
        """The pool's own pick, ranked by the request's preference, and why; `node` names the node the pool is on
        in the decision and its candidates, when a fleet router decides."""
        frame, memory, rows = self._frame, self._memory, self._rows
        request, config = frame.request, frame.config
        if not rows:
            return _decision(request, memory, None, f"no variants of {request.family}", node,
                             failure=FailureKind.EMPTY)
        # BALANCED's deadline share only while the GPU is quiet: under load the extra runner costs later callers.
        quiet = _load(memory, config) <= config.quiet_load
        share_time = request.time_remaining if quiet else None
        # Under load a slower runner's longer time-slicing costs the callers arriving meanwhile: a wider band of
        # equals.
        tolerance = config.quality_tolerance if quiet else config.busy_quality_tolerance
        # Would the preference have picked something that memory alone ruled out? Ranked first, so that the
        # feasible ranking's scores are the ones listed.
        blocked: _Row | None = None
        if any(row.memory_only for row in rows):
            unconstrained = _best([row for row in rows if not row.rejection or row.memory_only], request.preference,
                                  config, share_time, tolerance)
            blocked = unconstrained if unconstrained is not None and unconstrained.memory_only else None
            for row in rows:
                row.score = 0.0
        feasible = [row for row in rows if not row.rejection]
        best = _best(feasible, request.preference, config, share_time, tolerance)
        sole = ""
        if (best is not None and config.sole_runner_as_balanced and request.preference is not Preference.BALANCED
                and request.time_remaining is not None and not best.resident and not frame.busy_runners
                and (sole := _sole_runner(best, feasible, frame.usable))):
            best = _best(feasible, Preference.BALANCED, config, None, tolerance)
        listed = tuple([row.assessment(node) for row in rows])

        if best is None:
            if all(row.memory_only for row in rows):
                failure = FailureKind.MEMORY
            elif all(row.deadline_only for row in rows):
                failure = FailureKind.DEADLINE
            else:
                failure = FailureKind.CONSTRAINTS
            why = "; ".join(f"{row.tag}: {row.rejection}" for row in rows)
            return _decision(request, memory, None, f"no variant of {request.family} can serve this request ({why})",
                             node, candidates=listed, failure=failure,
                             best_expected_seconds=min(row.expected for row in rows))

        chosen = listed[rows.index(best)]
        lost = listed[rows.index(blocked)] if blocked is not None else None
        reason = _explain(request, chosen, lost) + sole
        if request.preference is Preference.QUALITY and not quiet and chosen.quality < max(
                row.quality for row in rows if not row.rejection and row.tier == best.tier) - config.quality_tolerance:
            reason += (f"; {_load_text(memory, config)} > {config.quiet_load:g}: qualities within "
                       f"{tolerance:g} of the best count as equal, so the faster")
        return _decision(request, memory, chosen, reason, node, candidates=listed, downgraded=lost is not None)


def decide(
    request: RoutingRequest,
    candidates: Sequence[CandidateInput],
    memory: MemoryView,
    config: PolicyConfig = PolicyConfig(),
    node: str = "",
) -> Decision:
    """Pick the variant for `request` among `candidates` (the family's variants); `node` names the node they are
    on in the decision and its candidates, when a fleet router decides (set here, not copied in afterwards)."""
    return Appraisal(request, candidates, memory, config).decision(node)


def _sole_runner(pick: _Row, feasible: Sequence[_Row], usable: float) -> str:
    """Why `pick`, loaded now, would be the family's only runner (no feasible sibling fits beside it, so it serves
    every preference until evicted, and a 70B's or a long context's reload outlasts a LATENCY deadline); empty
    when a sibling fits beside it. A sibling below the speed floor does not count: it serves only under memory
    pressure, so the callers the pick does not suit would still have nothing else."""
    smallest = min((row.need for row in feasible if row is not pick and not row.below_floor), default=None)
    if smallest is None or pick.need + smallest <= usable:
        return ""
    return (f"; {pick.tag} would be the family's only runner ({format_bytes(pick.need)} + the smallest sibling's "
            f"{format_bytes(smallest)} > {format_bytes(int(usable))} usable), serving every preference until "
            "evicted: ranked as balanced")


def _decision(request: RoutingRequest, memory: MemoryView, chosen: Assessment | None, reason: str, node: str, *,
              candidates: tuple[Assessment, ...] = (), downgraded: bool = False, failure: FailureKind | None = None,
              best_expected_seconds: float = 0.0) -> Decision:
    return _new_decision(request.family, request.preference, chosen, reason, candidates, downgraded,
                         pinned=request.pinned_tag is not None, fallback=bool(request.excluded), failure=failure,
                         memory_source=memory.source, free_bytes=memory.free_bytes,
                         node=node, best_expected_seconds=best_expected_seconds)


def _explain(request: RoutingRequest, chosen: Assessment, blocked: Assessment | None) -> str:
    speed = f"{chosen.tokens_per_second:.0f} tok/s{'' if chosen.measured else ' (prior)'}"
    where = "resident" if chosen.resident else f"cold load ≈ {chosen.time_to_first_token:.1f} s"
    if request.pinned_tag is not None:
        head = f"pinned {chosen.tag}"
    elif request.excluded:
        head = f"fell back to {chosen.tag} after {', '.join(sorted(request.excluded))} failed"
    else:
        head = f"{request.preference.value}: {chosen.tag}"
    text = f"{head} (quality {chosen.quality:.3f}, {speed}, {where}, expected {chosen.expected_seconds:.2f} s)"
    if blocked is not None:
        text += f"; downgraded from {blocked.tag}, which {blocked.rejection}"
    return text
