"""Queueing-aware planning: the schedule with the most throughput among those that keep at least
99 % of requests within the latency bound at a given arrival process, checked in the simulator.

The search's latency bound (``optimizer.analytic``) is the paper's: a saturated system, no
queueing. Under an arrival process a request also waits for its turn, so a schedule that meets the
bound at saturation may let far more than 1 % of requests overrun it at a rate close to its
capacity. ``queueing_search`` therefore collects candidates from searches under the bound and
under tighter ones (a tighter bound leaves room for the wait), keeps those whose predicted capacity
exceeds the arrival rate, and simulates them best first with the requests arriving as given
(Poisson, a renewal process of chosen burstiness, or a trace's timestamps); the first whose share
of requests within the bound (end to end, from arrival) is at least ``target`` is the plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from optimizer.analytic import Scenario
from optimizer.lengths import TraceRequest, Workload
from optimizer.schedule import Schedule
from optimizer.search import PRODUCT_POLICIES, Candidate, SearchResult, SearchSpace, branch_and_bound
from optimizer.simulator import SimRequest, SimulationResult, simulate, within_bound

TARGET = 0.99  # share of requests within the bound
TIGHTEN = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)  # bounds searched, as fractions of the bound
MAX_CHECKS = 10  # candidates simulated at most
REQUESTS = 600


def arrival_times(rng: np.random.Generator, n: int, rate_per_s: float, cv: float = 1.0) -> np.ndarray:
    """``n`` arrival times of a renewal process at ``rate_per_s`` whose gaps have coefficient of
    variation ``cv`` (gamma-distributed; 1: Poisson, > 1: bursty, < 1: smoother)."""
    if rate_per_s <= 0 or cv <= 0 or n < 1:
        raise ValueError(f"need rate > 0, burstiness > 0 and n >= 1, got {rate_per_s}, {cv}, {n}")
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (rate_per_s * shape), n)
    times: np.ndarray = np.cumsum(gaps) - gaps[0]
    return times


def requests_at(
    workload: Workload, times: Sequence[float] | np.ndarray, seed: int = 0, tag: str = "q"
) -> tuple[SimRequest, ...]:
    """Requests with lengths drawn from ``workload`` arriving at ``times``."""
    ins, outs = workload.sample(np.random.default_rng(seed), len(times))
    return tuple(
        SimRequest(f"{tag}-{i:05d}", int(a), int(b), float(t)) for i, (a, b, t) in enumerate(zip(ins, outs, times))
    )


def requests_from_trace(
    rows: Sequence[TraceRequest], limit: int = 0, max_input: int = 0, max_output: int = 0
) -> tuple[SimRequest, ...]:
    """A trace's requests as they arrived (the first ``limit``, 0: all), lengths clipped like the
    workload built from it."""
    rows = list(rows)[: limit or None]
    clip: Callable[[int, int], int]
    clip = lambda v, top: min(v, top) if top else v  # noqa: E731
    return tuple(
        SimRequest(f"t-{i:05d}", clip(r.input_len, max_input), clip(r.output_len, max_output), r.arrival_s)
        for i, r in enumerate(rows)
    )


def offered_rate(requests: Sequence[SimRequest]) -> float:
    """Requests per second the arrivals offer (their count over the span between the first and
    the last, less one gap)."""
    times = sorted(r.arrival_s for r in requests)
    span = times[-1] - times[0]
    return (len(times) - 1) / span if span > 0 else math.inf


@dataclass(frozen=True)
class QueueingPlan:
    best: Candidate | None  # None: no candidate keeps the share within the bound
    share_within: float  # of ``best`` (or of the last candidate checked)
    simulated: SimulationResult | None
    rate_per_s: float  # offered by the arrivals
    candidates: int  # distinct candidates found with enough capacity
    checked: int  # simulated
    searches: int
    evaluations: int


def candidates(
    sc: Scenario,
    latency_bound_s: float,
    rate_per_s: float,
    policies: Sequence[str] = PRODUCT_POLICIES,
    space: SearchSpace = SearchSpace(),
    fractions: Sequence[float] = TIGHTEN,
    search: Callable[..., SearchResult] = branch_and_bound,
) -> tuple[list[Candidate], int, int]:
    """Distinct best schedules of searches under ``latency_bound_s`` times each of ``fractions``
    (with no bound: under the least-latency candidates' bounds is not defined, so the one search),
    each policy set apart, whose predicted throughput exceeds ``rate_per_s``; best first.
    Returns (candidates, searches, evaluations)."""
    groups = [tuple(policies)] + [(p,) for p in policies if len(policies) > 1]
    found: dict[Schedule, Candidate] = {}
    searches = evaluations = 0
    bounds = [latency_bound_s] if math.isinf(latency_bound_s) else [latency_bound_s * f for f in fractions]
    for bound in bounds:
        for g in groups:
            r = search(sc, bound, g, space)
            searches += 1
            evaluations += r.evaluations
            if r.best is not None and r.best.figures.throughput_seq_s > rate_per_s:
                found.setdefault(r.best.schedule, r.best)
    ranked = sorted(found.values(), key=lambda c: -c.figures.throughput_seq_s)
    return ranked, searches, evaluations


def check(
    sc: Scenario,
    latency_bound_s: float,
    requests: Sequence[SimRequest],
    ranked: Sequence[Candidate],
    *,
    target: float = TARGET,
    max_checks: int = MAX_CHECKS,
) -> tuple[Candidate | None, float, SimulationResult | None, int]:
    """Simulate ``ranked`` best first with ``requests`` arriving as they do; the first that keeps
    at least ``target`` of them within the bound (end to end, from arrival). Returns (that
    candidate or None, its share within the bound (or the last one's), its simulation, checked)."""
    share, sim, checked = math.nan, None, 0
    for cand in list(ranked)[:max_checks]:
        sim = simulate(sc, cand.schedule, tuple(requests))
        checked += 1
        share = within_bound(sim, latency_bound_s)
        if share >= target:
            return cand, share, sim, checked
    return None, share, sim, checked


def queueing_search(
    sc: Scenario,
    latency_bound_s: float,
    requests: Sequence[SimRequest],
    policies: Sequence[str] = PRODUCT_POLICIES,
    space: SearchSpace = SearchSpace(),
    *,
    target: float = TARGET,
    max_checks: int = MAX_CHECKS,
    search: Callable[..., SearchResult] = branch_and_bound,
) -> QueueingPlan:
    """``candidates`` under the arrivals' rate, then ``check``: the candidate with the most
    predicted throughput that keeps ``target`` of the requests within the bound."""
    if not requests:
        raise ValueError("queueing_search needs requests")
    rate = offered_rate(requests)
    ranked, searches, evaluations = candidates(sc, latency_bound_s, rate, policies, space, search=search)
    best, share, sim, checked = check(sc, latency_bound_s, requests, ranked, target=target, max_checks=max_checks)
    return QueueingPlan(best, share, sim, rate, len(ranked), checked, searches, evaluations)


def sustained_rate(
    sc: Scenario,
    schedule: Schedule,
    latency_bound_s: float,
    upper_per_s: float,
    *,
    requests: int = 400,
    span_bounds: float = 40.0,
    seeds: Sequence[int] = (0, 1),
    target: float = TARGET,
    steps: int = 7,
) -> float:
    """The highest Poisson arrival rate, to ``upper_per_s / 2**steps``, at which ``schedule``
    keeps ``target`` of the requests within the bound (end to end, from arrival) in the
    simulator, with every seed's arrivals and lengths; 0 when even the lowest rate tried does not.
    Each rate runs ``requests`` requests, or more so that they arrive over at least
    ``span_bounds`` bounds: above capacity the queue then grows for long enough to push more than
    1 % of them past the bound (a short burst could be absorbed). Bisection on [0, upper_per_s]:
    it assumes the share falls as the rate rises (queues only grow), which holds up to the noise
    of the draws."""
    if not upper_per_s > 0:
        raise ValueError("sustained_rate needs a positive upper rate")

    def holds(rate: float) -> bool:
        n = max(requests, math.ceil(span_bounds * latency_bound_s * rate))
        for seed in seeds:
            times = arrival_times(np.random.default_rng(seed), n, rate)
            sim = simulate(sc, schedule, requests_at(sc.workload, times, seed))
            if within_bound(sim, latency_bound_s) < target:
                return False
        return True

    lo, hi = 0.0, upper_per_s
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if holds(mid) else (lo, mid)
    return lo
