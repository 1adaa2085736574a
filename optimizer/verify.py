"""A plan checked against the simulator before it is trusted.

The search ranks schedules by closed-form estimates (``optimizer.analytic``): fast enough to
evaluate thousands, but its latency is that of a p99-length request at the *mean* batch, so a
schedule it keeps just under a bound can overrun it once requests really queue, mix and finish
out of step. ``verified_search`` simulates the search's pick under the load the bound is meant
for (saturated closed loop, one request in ten a probe at the workload's 99th-percentile input and
output length, the p99-length latency taken over the probes: ``load_figures``, the same function
the benchmark applies to measured runs) and, while the simulated latency overruns the bound,
takes the picks of searches under a ladder of tighter bounds, best first, until one meets it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from optimizer.analytic import Scenario
from optimizer.lengths import Workload
from optimizer.schedule import Schedule
from optimizer.search import (
    BASELINES,
    PRODUCT_POLICIES,
    SEARCH_POLICIES,
    Candidate,
    SearchResult,
    SearchSpace,
    branch_and_bound,
)
from optimizer.simulator import Completion, LoadFigures, SimRequest, SimulationResult, load_figures, simulate

PROBE_EVERY = 10  # one request in ten is a probe at the 99th-percentile lengths
LOOP_WAVES = 4  # a closed loop sends at least this many times its size (half of it saturated)
MIN_REQUESTS = 200
# Bounds searched, as fractions of the bound, until a pick meets the bound in simulation.
LADDER = (1.0, 0.97, 0.94, 0.9, 0.86, 0.82, 0.77, 0.72, 0.66, 0.6, 0.5, 0.4, 0.3)
TRIES = len(LADDER)  # searches at most, the first included
MAX_SIMULATIONS = 6  # distinct picks simulated at most
REFINE = 3  # bisections between the first step of the ladder whose pick met the bound and the step before
# A closed-loop client's next request reaches a worker this long after a completion: the last
# token to the client and the new request back, two broker hops and the gateway (a hop is ~1 ms
# on a 2-core machine, docs/mesh.md). Its size hardly matters, only that it is not zero: the
# freed slot is filled at a later step boundary, not at the one where the request finished.
LOOP_DELAY_S = 0.003


@dataclass(frozen=True)
class ProbeLoad:
    """Requests in the order a closed loop sends them; ``probes`` are the p99-length ones."""

    requests: tuple[SimRequest, ...]
    probes: frozenset[str]

    @staticmethod
    def draw(workload: Workload, n: int, seed: int = 0, tag: str = "r") -> ProbeLoad:
        rng = np.random.default_rng(seed)
        ins, outs = workload.sample(rng, n)
        q_in, q_out = workload.input.quantile(0.99), workload.output.quantile(0.99)
        requests, probes = [], set()
        for i in range(n):
            rid = f"{tag}-{i:04d}"
            if i % PROBE_EVERY == PROBE_EVERY - 1:
                ins[i], outs[i] = q_in, q_out
                probes.add(rid)
            requests.append(SimRequest(rid, int(ins[i]), int(outs[i])))
        return ProbeLoad(tuple(requests), frozenset(probes))

    def first(self, n: int) -> ProbeLoad:
        head = self.requests[:n]
        return ProbeLoad(head, self.probes & {r.request_id for r in head})


def outstanding(schedule: Schedule) -> int:
    """Requests a saturated closed loop keeps in flight: one per request slot of the schedule, so
    every slot is full and none waits for one. Under WAA the slots are the decoders' (an encoder
    encodes only against a credit, a decode slot it reserves), so a request the loop sent beyond
    them would only queue in front of the encoder for a slot to free, a wait no other policy's
    loop has and its latency model does not count."""
    if schedule.split:
        return schedule.decoder_workers * schedule.decode_batch
    return schedule.workers * schedule.decode_batch


def requests_for(schedule: Schedule, at_least: int = MIN_REQUESTS) -> int:
    """Requests a closed-loop run of ``schedule`` sends: ``at_least``, and ``LOOP_WAVES`` times
    its loop, so that the saturated part (after the first wave, before the drain) is half of it."""
    return max(at_least, LOOP_WAVES * outstanding(schedule))


def simulated_figures(
    sc: Scenario, schedule: Schedule, load: ProbeLoad, loop_delay_s: float = LOOP_DELAY_S
) -> LoadFigures:
    """Throughput and p99-length latency of ``load`` under ``schedule`` in a saturated closed
    loop, on the simulator's time line."""
    return run_figures(simulate_load(sc, schedule, load, loop_delay_s), load, schedule)


def simulate_load(
    sc: Scenario, schedule: Schedule, load: ProbeLoad, loop_delay_s: float = LOOP_DELAY_S
) -> SimulationResult:
    """``load`` under ``schedule`` in a saturated closed loop: the simulation itself."""
    return simulate(sc, schedule, load.requests, closed_loop=outstanding(schedule), loop_delay_s=loop_delay_s)


def run_figures(sim: SimulationResult, load: ProbeLoad, schedule: Schedule) -> LoadFigures:
    return load_figures(
        [Completion(r.request_id, r.arrival_s, r.finish_s) for r in sim.records], load.probes, outstanding(schedule)
    )


@dataclass(frozen=True)
class Verified:
    """The pick, its simulated figures, and how the search got there."""

    best: Candidate | None  # None: no schedule meets even the tightened bound
    simulated: LoadFigures | None  # of ``best``
    searched_bound_s: float  # the bound whose search gave the pick (none: the last search's bound)
    searches: int
    evaluations: int  # over all searches
    last: SearchResult  # that search's own result (its families, pruning)

    @property
    def meets_bound(self) -> bool:
        return self.best is not None


def verified_search(
    sc: Scenario,
    latency_bound_s: float,
    policies: Sequence[str] = SEARCH_POLICIES,
    space: SearchSpace = SearchSpace(),
    *,
    requests: int = MIN_REQUESTS,
    seed: int = 0,
    tries: int = TRIES,
    simulations: int = MAX_SIMULATIONS,
    refine: int = REFINE,
    search: Callable[..., SearchResult] = branch_and_bound,
) -> Verified:
    """The best schedule, among the search's picks under the bound and under a ladder of tighter
    bounds (``LADDER``: 100 %, 97 %, 94 %, ... 30 % of it), whose *simulated* p99-length latency
    meets ``latency_bound_s``.

    The picks are tried in the ladder's order (a tighter bound never gives more predicted
    throughput, so this is best first); a pick already simulated is not simulated again. Each
    simulation runs ``requests`` requests, at least four closed loops. With no bound (inf) the
    pick is simulated once, for its figures. After ``tries`` searches or ``simulations``
    simulations without a schedule that meets the bound, ``best`` is None.

    The ladder's steps are coarse, and a pick that overran may sit just above one that would
    meet the bound: once a step's pick meets it, ``refine`` bisections between that step and the
    one before it (whose pick overran) look for a better pick that still meets it.
    """
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    evaluations, searches = 0, 0
    overran: set[Schedule] = set()

    def run(fraction: float) -> SearchResult:
        nonlocal evaluations, searches
        searches += 1
        result = search(sc, latency_bound_s * fraction, policies, space)
        evaluations += result.evaluations
        return result

    def meets(schedule: Schedule) -> LoadFigures | None:
        load = ProbeLoad.draw(sc.workload, requests_for(schedule, requests), seed)
        figures = simulated_figures(sc, schedule, load)
        latency = figures.p99_length_latency_s
        if math.isinf(latency_bound_s) or (math.isfinite(latency) and latency <= latency_bound_s):
            return figures
        overran.add(schedule)
        return None

    fractions = (1.0,) if math.isinf(latency_bound_s) else LADDER
    found: tuple[SearchResult, LoadFigures, float] | None = None
    failed_at: float | None = None
    fraction = 1.0
    for fraction in fractions[:tries]:
        result = run(fraction)
        if result.best is None:
            break  # a tighter bound has no schedule either
        schedule = result.best.schedule
        if schedule in overran:
            failed_at = fraction
            continue
        if len(overran) >= simulations:
            break
        figures = meets(schedule)
        if figures is not None:
            found = (result, figures, fraction)
            break
        failed_at = fraction
    if found is None:  # (tries >= 1: a search ran)
        return Verified(None, None, latency_bound_s * fraction, searches, evaluations, result)
    ok, bad = found[2], failed_at
    for _ in range(refine):
        if bad is None:
            break
        mid = (ok + bad) / 2
        result = run(mid)
        best = found[0].best
        assert best is not None  # (what was found is a search's pick)
        if result.best is None or result.best.schedule in overran:
            bad = mid
        elif (
            result.best.schedule == best.schedule
            or result.best.figures.throughput_seq_s <= best.figures.throughput_seq_s
        ):
            ok = mid
        elif (figures := meets(result.best.schedule)) is not None:
            found, ok = (result, figures, mid), mid
        else:
            bad = mid
    result, figures, fraction = found
    return Verified(result.best, figures, latency_bound_s * fraction, searches, evaluations, result)


@dataclass(frozen=True)
class Pick:
    """What the product runs: the best simulator-checked schedule over its families, and the
    checked picks it was chosen from (``by_group``: the product's own search, the paper's policies,
    and each baseline alone), so the paper's best is reported beside it."""

    best: Verified  # the pick (``best.best`` None: nothing meets the bound)
    policies: tuple[str, ...]  # the policy set whose verified search gave the pick
    by_group: dict[tuple[str, ...], Verified]


GROUPS = (PRODUCT_POLICIES, SEARCH_POLICIES) + tuple((p,) for p in BASELINES)


def _throughput(v: Verified) -> float:
    return v.best.figures.throughput_seq_s if v.best is not None else -math.inf


def verified_pick(
    sc: Scenario,
    latency_bound_s: float,
    space: SearchSpace = SearchSpace(),
    *,
    groups: Sequence[tuple[str, ...]] = GROUPS,
    seed: int = 0,
    search: Callable[..., SearchResult] = branch_and_bound,
) -> Pick:
    """``verified_search`` over the product's families and, apart, over the paper's policies and
    each baseline; the pick is the one of these with the most predicted throughput whose simulated
    latency meets the bound. Tightening the bound is a heuristic that may land one policy set
    below another's own checked pick; taking the best of the checked picks means the product is
    never below a baseline that passes the same check."""
    by_group = {tuple(g): verified_search(sc, latency_bound_s, g, space, seed=seed, search=search) for g in groups}
    key = max(by_group, key=lambda g: (_throughput(by_group[g]), g == tuple(groups[0])))
    return Pick(by_group[key], key, by_group)
