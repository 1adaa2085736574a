"""A plan checked against the simulator before it is trusted.

The search ranks schedules by closed-form estimates (``optimizer.analytic``): fast enough to
evaluate thousands, but its latency is that of a p99-length request at the *mean* batch, so a
schedule it keeps just under a bound can overrun it once requests really queue, mix and finish
out of step. ``verified_search`` simulates the search's pick under the load the bound is meant
for (saturated closed loop, one request in ten a probe at the workload's 99th-percentile input and
output length, the p99-length latency taken over the probes: ``load_figures``, the same function
the benchmark applies to measured runs) and, while the simulated latency overruns the bound,
searches again with the bound tightened by the overrun.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from optimizer.analytic import Scenario
from optimizer.lengths import Workload
from optimizer.schedule import Schedule
from optimizer.search import SEARCH_POLICIES, Candidate, SearchResult, SearchSpace, branch_and_bound
from optimizer.simulator import Completion, LoadFigures, SimRequest, SimulationResult, load_figures, simulate

PROBE_EVERY = 10  # one request in ten is a probe at the 99th-percentile lengths
LOOP_WAVES = 4  # a closed loop sends at least this many times its size (half of it saturated)
MIN_REQUESTS = 200
TRIES = 5  # searches at most, the first included
MARGIN = 0.98  # a tightened bound aims this much below what the overrun alone asks
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
    def draw(workload: Workload, n: int, seed: int = 0, tag: str = "r") -> "ProbeLoad":
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

    def first(self, n: int) -> "ProbeLoad":
        head = self.requests[:n]
        return ProbeLoad(head, self.probes & {r.request_id for r in head})


def outstanding(schedule: Schedule) -> int:
    """Requests a saturated closed loop keeps in flight: every decode slot full (and, under WAA,
    every encode batch of every encoder)."""
    if schedule.split:
        return schedule.decoder_workers * schedule.decode_batch + schedule.encoder_workers * schedule.encode_batch
    return schedule.workers * schedule.decode_batch


def requests_for(schedule: Schedule, at_least: int = MIN_REQUESTS) -> int:
    """Requests a closed-loop run of ``schedule`` sends: ``at_least``, and ``LOOP_WAVES`` times
    its loop, so that the saturated part (after the first wave, before the drain) is half of it."""
    return max(at_least, LOOP_WAVES * outstanding(schedule))


def simulated_figures(sc: Scenario, schedule: Schedule, load: ProbeLoad,
                      loop_delay_s: float = LOOP_DELAY_S) -> LoadFigures:
    """Throughput and p99-length latency of ``load`` under ``schedule`` in a saturated closed
    loop, on the simulator's time line."""
    return run_figures(simulate_load(sc, schedule, load, loop_delay_s), load, schedule)


def simulate_load(sc: Scenario, schedule: Schedule, load: ProbeLoad,
                  loop_delay_s: float = LOOP_DELAY_S) -> SimulationResult:
    """``load`` under ``schedule`` in a saturated closed loop: the simulation itself."""
    return simulate(sc, schedule, load.requests, closed_loop=outstanding(schedule), loop_delay_s=loop_delay_s)


def run_figures(sim: SimulationResult, load: ProbeLoad, schedule: Schedule) -> LoadFigures:
    return load_figures([Completion(r.request_id, r.arrival_s, r.finish_s) for r in sim.records], load.probes,
                        outstanding(schedule))


@dataclass(frozen=True)
class Verified:
    """The pick, its simulated figures, and how the search got there."""

    best: Candidate | None  # None: no schedule meets even the tightened bound
    simulated: LoadFigures | None  # of ``best``
    searched_bound_s: float  # the bound the last search used (the requested one if never tightened)
    searches: int
    evaluations: int  # over all searches
    last: SearchResult  # the last search's own result (its families, pruning)

    @property
    def meets_bound(self) -> bool:
        return self.best is not None


def verified_search(sc: Scenario, latency_bound_s: float, policies: Sequence[str] = SEARCH_POLICIES,
                    space: SearchSpace = SearchSpace(), *, requests: int = MIN_REQUESTS, seed: int = 0,
                    tries: int = TRIES,
                    search: Callable[..., SearchResult] = branch_and_bound) -> Verified:
    """The search's best schedule whose *simulated* p99-length latency meets ``latency_bound_s``.

    Each try searches, simulates the pick (``requests`` requests, at least four closed loops),
    and stops when it meets the bound; otherwise the next search's bound is the last one times
    (bound / simulated latency) x ``MARGIN``. With no bound (inf) the pick is simulated once, for
    its figures. After ``tries`` searches without a schedule that meets the bound, ``best`` is None.
    """
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    target, evaluations = latency_bound_s, 0
    for attempt in range(1, tries + 1):
        result = search(sc, target, policies, space)
        evaluations += result.evaluations
        if result.best is None:
            return Verified(None, None, target, attempt, evaluations, result)
        schedule = result.best.schedule
        load = ProbeLoad.draw(sc.workload, requests_for(schedule, requests), seed)
        figures = simulated_figures(sc, schedule, load)
        latency = figures.p99_length_latency_s
        if math.isinf(latency_bound_s) or (math.isfinite(latency) and latency <= latency_bound_s):
            return Verified(result.best, figures, target, attempt, evaluations, result)
        if not math.isfinite(latency):
            return Verified(None, None, target, attempt, evaluations, result)
        target = min(target * latency_bound_s / latency * MARGIN, target * MARGIN)
    return Verified(None, None, target, tries, evaluations, result)
