"""Planning for the traffic that arrives: the schedule with the best SLO attainment at the
forecast arrival process, checked in the simulator.

The search (``optimizer.search``) maximises saturated throughput under the paper's bound; a
serving system is judged by goodput, the requests per second that meet their SLO under the load
that actually comes. Below saturation a smaller batch serves each request sooner; near it, only a
larger one keeps the queue from growing. So:

1. **Candidates** (``candidates``): the least-latency schedule of the policies allowed, and the
   searches' picks under a ladder of bounds from just above that least latency to none, each
   policy set apart: the frontier from quick-and-small to large-and-slow.
2. **Weighing** (``weigh``): each candidate whose saturated capacity carries ``SURGE`` times the
   forecast rate (else the forecast rate itself, else any) simulated
   with requests arriving as forecast, with headroom (a renewal process at ``STRESS`` times the
   forecast rate and the forecast burstiness, lengths from the observed workload, queueing
   included: the same ``simulate`` that drives the workers' policy objects), its attainment and
   percentiles read against the SLO (``optimizer.slo``); when none reaches the SLO's target with
   headroom, weighed again at the forecast rate itself. While the rate has not fallen, none
   smaller than the schedule in force (``keep_capacity``); a schedule the mesh measured below
   its prediction, at what was measured, and so is any schedule ``alike`` it (``observed``: the
   scheduler remembers each schedule's shortfall a while, so it does not switch back to one that
   just failed, or to its twin, on the strength of the model alone).
3. **Choice** (``choose``): the one with the highest attainment; ties (within ``TIE``) go to the
   one with the most slack against its bounds (least ``pressure``, in steps of ``SLACK_TIE``),
   where slack beyond ``COMFORT`` counts as none (a user sees no difference between two schedules
   that both keep their figures well inside the bounds), then to the one with the most capacity.
   So traffic that every candidate serves comfortably gets the one with the most capacity (the
   forecast lags a rise, and a small batch's capacity is what the model overrates most), and a
   quicker schedule is chosen when the larger one would come close to a bound. When none
   reaches the SLO's target at the forecast, the one that sustains the highest rate
   (``sustained``, of the few with the best attainment that carry the forecast; one that does
   not sustain the best rate found before it is left at NaN).

``forecast`` is the arrival forecaster the scheduler uses: the next interval's rate is the larger
of the mean over the last ``SHORT_S`` and over the last ``LONG_S`` seconds (a rise shows within
``SHORT_S``; a fall only after ``LONG_S``, so the plan errs towards capacity), its burstiness the
coefficient of variation of the newest inter-arrival gaps.

Pure: no clock, no I/O; seeds are passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from optimizer.analytic import Scenario
from optimizer.lengths import Workload
from optimizer.queueing import arrival_times, requests_at
from optimizer.schedule import Schedule
from optimizer.search import PRODUCT_POLICIES, SearchResult, SearchSpace, branch_and_bound, least_latency
from optimizer.simulator import SimRequest, simulate
from optimizer.slo import Slo, SloFigures, figures
from optimizer.verify import ProbeLoad, requests_for, simulated_figures

SHORT_S, LONG_S = 5, 30  # the forecaster's windows, seconds
# Bounds searched for candidates, as multiples of the least latency any schedule reaches (inf: none)
LADDER = (1.1, 1.5, 2.2, 3.5, 6.0, math.inf)
TIE = 0.003  # attainments this close are equal: the one with more slack wins
SLACK_TIE = 0.05  # pressures (figure / bound) this close are equal: the one with more capacity wins
COMFORT = 0.75  # pressures below this are equal too: figures at three quarters of their bounds or less
MIN_REQUESTS, MAX_REQUESTS, SPAN_S = 200, 500, 30.0  # requests a weighing simulates: SPAN_S of arrivals
MAX_WEIGHED = 10  # candidates simulated at most
ENOUGH = 3  # weighing stops once this many candidates reach the target
SUSTAINED_OF = 3  # when nothing reaches the target: the sustained rate of this many best candidates
CAPACITY_HEADROOM = 1.05  # a candidate whose saturated throughput is below rate x this cannot carry it
# Candidates are drawn first from those whose saturated throughput carries the forecast rate times
# this: the forecast lags a rise (a step to three times the rate is first forecast at about half of
# it) and a search on a loaded machine takes seconds, so the schedule in force must absorb a surge
# until the next one; below this, a quicker schedule buys no SLO attainment a user sees
SURGE = 2.0
# Candidates are weighed at the forecast rate times this: the forecast, the lengths and the model
# all err, and a schedule that just meets the SLO at the forecast misses it at the first burst
STRESS = 1.5
# While capacity is kept (``plan_for_traffic``'s ``keep_capacity``), candidates down to this share of
# the schedule in force's saturated capacity still count as keeping it: the search's capacities err
# by 10-25 % by policy, so a schedule 5 % below the one in force on that scale is no smaller in the
# mesh, and the largest schedule by that figure (a mixed or continuous batch that meets no TPOT bound
# at the rate, say) must not be the only one weighed
KEEP_SHARE = 0.9
# Schedules whose batch sizes (and RRA's decode iterations per encode) are within this share of
# each other run alike in the mesh, where the model errs alike: an attainment the mesh measured
# for one caps the other's (``seen``)
ALIKE = 0.25
# Policies that batch alike for ``alike``: a mixed batch is a continuous one whose prompts are cut
# into chunks, so the model errs alike on both (seen: mixed 16 measured 7 points below the model,
# then continuous 15 chosen for the model's figure met 10 points less again)
FAMILY = {"mixed": "continuous"}


@dataclass(frozen=True)
class Forecast:
    """The arrival process the next interval is expected to bring."""

    rate_per_s: float
    cv: float  # of inter-arrival gaps (1: Poisson)

    @property
    def known(self) -> bool:
        return self.rate_per_s > 0


def forecast(counts_per_s: Sequence[float], cv: float) -> Forecast:
    """From arrivals counted per whole second (oldest first, the second under way excluded) and
    the gaps' coefficient of variation (NaN or unknown: 1)."""
    counts = np.asarray(counts_per_s, dtype=float)
    if not len(counts) or counts.sum() <= 0:
        return Forecast(0.0, 1.0)
    rate = max(float(counts[-SHORT_S:].mean()), float(counts[-LONG_S:].mean()))
    return Forecast(rate, cv if math.isfinite(cv) and cv > 0 else 1.0)


@dataclass(frozen=True)
class Weighed:
    """A candidate and what it does at the forecast load."""

    schedule: Schedule
    capacity_seq_s: float  # predicted saturated throughput (the search's figure)
    slo: SloFigures  # simulated at the forecast
    sustained_rate_s: float = math.nan  # computed only when no candidate reaches the target
    modelled: float = math.nan  # where ``attainment`` is what the mesh measured: the model's figure

    @property
    def attainment(self) -> float:
        return self.slo.attainment


@dataclass(frozen=True)
class TrafficPlan:
    best: Weighed
    weighed: tuple[Weighed, ...]  # best first
    reaches_target: bool  # the pick meets the SLO's target attainment at the forecast
    forecast: Forecast
    searches: int


def candidates(
    sc: Scenario,
    policies: Sequence[str] = PRODUCT_POLICIES,
    space: SearchSpace = SearchSpace(),
    ladder: Sequence[float] = LADDER,
    search: Callable[..., SearchResult] = branch_and_bound,
) -> tuple[list[tuple[Schedule, float]], int]:
    """Distinct (schedule, saturated throughput) pairs from the least-latency schedule to the
    unbounded search's pick; and the searches run."""
    quickest = least_latency(sc, policies, space).best
    if quickest is None:
        return [], 1
    found = {quickest.schedule: float(quickest.figures.throughput_seq_s)}
    groups = [tuple(policies)] + ([(p,) for p in policies] if len(policies) > 1 else [])
    searches = 1
    floor = float(quickest.figures.latency_p99_s)
    for multiple in ladder:
        for g in groups:
            result = search(sc, floor * multiple, g, space)
            searches += 1
            if result.best is not None:
                found.setdefault(result.best.schedule, float(result.best.figures.throughput_seq_s))
    return sorted(found.items(), key=lambda item: -item[1]), searches


def arrivals(workload: Workload, fc: Forecast, seed: int = 0) -> tuple[SimRequest, ...]:
    """The requests a weighing simulates: ``SPAN_S`` seconds of the forecast process (within
    ``MIN_REQUESTS``..``MAX_REQUESTS``), lengths drawn from ``workload``."""
    n = int(min(max(fc.rate_per_s * SPAN_S, MIN_REQUESTS), MAX_REQUESTS))
    times = arrival_times(np.random.default_rng(seed), n, fc.rate_per_s, fc.cv)
    return requests_at(workload, times, seed)


def with_headroom(fc: Forecast) -> Forecast:
    """The arrival process candidates are weighed at: ``STRESS`` times the forecast rate."""
    return Forecast(fc.rate_per_s * STRESS, fc.cv)


def to_weigh(
    found: Sequence[tuple[Schedule, float]], fc: Forecast, current: Schedule | None, floor: float = 0.0
) -> list[tuple[Schedule, float]]:
    """The candidates worth simulating, the largest first: those whose saturated capacity carries
    ``SURGE`` times the forecast rate; if none does, those that carry the rate itself; else all
    of them; none with less capacity than ``floor``. At most ``MAX_WEIGHED``, spread over the
    range when there are more."""
    others = [(s, c) for s, c in found if s != current and c >= floor]
    able = next(
        (
            tier
            for tier in (
                [(s, c) for s, c in others if c >= fc.rate_per_s * headroom] for headroom in (SURGE, CAPACITY_HEADROOM)
            )
            if tier
        ),
        others,
    )
    able = sorted(able, key=lambda item: -item[1])
    if len(able) <= MAX_WEIGHED:
        return able
    picks = np.unique(np.linspace(0, len(able) - 1, MAX_WEIGHED).round().astype(int))
    return [able[i] for i in picks]


def weigh_all(
    sc: Scenario,
    slo: Slo,
    fc: Forecast,
    chosen: Sequence[tuple[Schedule, float]],
    current: Schedule | None,
    seed: int,
    current_capacity: float = math.inf,
) -> list[Weighed]:
    """``current`` (its saturated capacity ``current_capacity``: inf when unknown) and ``chosen``
    (the largest first) weighed on the same arrivals of ``fc``, until ``ENOUGH`` of ``chosen``
    reach the SLO's target comfortably (pressure within ``COMFORT``): the next, smaller ones
    could not win the choice."""
    requests = arrivals(sc.workload, fc, seed)
    weighed = [weigh(sc, current, current_capacity, requests, slo)] if current is not None else []
    reached = 0
    for schedule, capacity in chosen:
        w = weigh(sc, schedule, capacity, requests, slo)
        weighed.append(w)
        reached += w.attainment >= slo.target - 1e-12 and w.slo.pressure <= COMFORT
        if reached >= ENOUGH:
            break
    return weighed


def weigh(sc: Scenario, schedule: Schedule, capacity: float, requests: Iterable[SimRequest], slo: Slo) -> Weighed:
    sim = simulate(sc, schedule, tuple(requests))
    return Weighed(schedule, capacity, figures(sim.records, slo))


def _order(w: Weighed) -> tuple[int, int, float]:
    return (-round(w.attainment / TIE), round(max(w.slo.pressure, COMFORT) / SLACK_TIE), -w.capacity_seq_s)


def carrying(weighed: Sequence[Weighed], fc: Forecast) -> list[Weighed]:
    """Those of ``weighed`` whose saturated capacity carries the forecast rate (all when none does)."""
    return [w for w in weighed if w.capacity_seq_s >= fc.rate_per_s * CAPACITY_HEADROOM] or list(weighed)


def choose(weighed: Sequence[Weighed], fc: Forecast, slo: Slo) -> tuple[Weighed, bool]:
    """The pick among ``weighed`` (see the module's docstring) and whether it reaches the target."""
    able = carrying(weighed, fc)
    best = min(able, key=_order)
    if best.attainment >= slo.target - 1e-12:
        return best, True
    rated = [w for w in able if math.isfinite(w.sustained_rate_s)]
    if rated:
        return max(rated, key=lambda w: (w.sustained_rate_s, w.attainment, w.capacity_seq_s)), False
    return best, False


def plan_for_traffic(
    sc: Scenario,
    slo: Slo,
    fc: Forecast,
    policies: Sequence[str] = PRODUCT_POLICIES,
    space: SearchSpace = SearchSpace(),
    *,
    seed: int = 0,
    current: Schedule | None = None,
    keep_capacity: bool = False,
    observed: Mapping[Schedule, float] | None = None,
    search: Callable[..., SearchResult] = branch_and_bound,
) -> TrafficPlan | None:
    """The schedule to run for ``fc`` under ``slo`` (None: no schedule fits in memory).
    ``current`` (the schedule in force, when comparable) is weighed on the same arrivals, so
    the caller can compare it with the pick on equal terms (it is among ``weighed``).
    ``keep_capacity`` (the rate has not fallen since ``current`` was planned): no candidate with
    less saturated capacity than ``KEEP_SHARE`` of ``current``'s (``capacity_of``) is weighed. A
    rise calls for more capacity, and a smaller schedule picked for its predicted latency at
    the higher rate rests on the model where it errs most: a small batch's capacity.
    ``observed``: schedules the mesh ran and measured short of their prediction, with the
    attainment measured; it caps the simulated one (what was seen beats what the model says of it)."""
    if not fc.known:
        raise ValueError("plan_for_traffic needs a forecast rate > 0")
    found, searches = candidates(sc, policies, space, search=search)
    if not found:
        return None
    capacity = capacity_of(sc, current, found) if current is not None else math.inf
    chosen = to_weigh(found, fc, current, capacity * KEEP_SHARE if keep_capacity else 0.0)
    stressed = with_headroom(fc)  # with headroom first: of those whose capacity could carry it
    able = [(s, c) for s, c in chosen if c >= stressed.rate_per_s * CAPACITY_HEADROOM]
    reaches = False
    if able:
        weighed = seen(weigh_all(sc, slo, stressed, able, current, seed, capacity), observed)
        best, reaches = choose(weighed, fc, slo)
    if not reaches:  # nothing keeps the SLO with headroom: at the forecast itself
        weighed = seen(weigh_all(sc, slo, fc, chosen, current, seed, capacity), observed)
        best, reaches = choose(weighed, fc, slo)
    if not reaches:  # nor at the forecast: the one that sustains the most, of those that carry it
        rates: dict[Schedule, float] = {}  # the best by attainment first: the others must beat it
        for w in sorted(carrying(weighed, fc), key=_order)[:SUSTAINED_OF]:
            rates[w.schedule] = sustained(
                sc, w.schedule, slo, fc, seed, beat=max((r for r in rates.values() if math.isfinite(r)), default=0.0)
            )
        weighed = [replace(w, sustained_rate_s=rates[w.schedule]) if w.schedule in rates else w for w in weighed]
        best, reaches = choose(weighed, fc, slo)
    ordered = tuple(sorted(weighed, key=lambda w: (w is not best, _order(w))))
    return TrafficPlan(best, ordered, reaches, fc, searches)


def capacity_of(sc: Scenario, schedule: Schedule, found: Sequence[tuple[Schedule, float]]) -> float:
    """``schedule``'s saturated throughput on the search's scale: the search's figure where it is
    among ``found``; else its closed-loop simulation's, times the search's figure over the
    simulation's for the candidate of its policy nearest in batch sizes (the simulator runs 10-25 %
    below the search's analytic model, by policy more than by size). So a schedule in force that no
    search picks now (a new workload, a calibration) still sets a floor."""
    known = dict(found).get(schedule)
    if known is not None:
        return known
    simulated = closed_loop_throughput(sc, schedule)
    peers = [(s, c) for s, c in found if s.policy == schedule.policy]
    if not peers:
        return simulated
    peer, peer_capacity = min(
        peers,
        key=lambda item: (
            abs(item[0].decode_batch - schedule.decode_batch) + abs(item[0].encode_batch - schedule.encode_batch)
        ),
    )
    return simulated * peer_capacity / closed_loop_throughput(sc, peer)


def closed_loop_throughput(sc: Scenario, schedule: Schedule) -> float:
    load = ProbeLoad.draw(sc.workload, requests_for(schedule), seed=0)
    return float(simulated_figures(sc, schedule, load).throughput_seq_s)


def seen(weighed: list[Weighed], observed: Mapping[Schedule, float] | None) -> list[Weighed]:
    """``weighed`` with each schedule at most at the attainment measured of any schedule of
    ``observed`` ``alike`` it: the model errs alike on both, so the other is no escape from
    what was measured."""
    if not observed:
        return weighed
    out = []
    for w in weighed:
        measured = [attained for s, attained in observed.items() if alike(s, w.schedule)]
        out.append(
            replace(w, slo=replace(w.slo, attainment=min(w.attainment, *measured)), modelled=w.attainment)
            if measured
            else w
        )
    return out


def alike(a: Schedule, b: Schedule) -> bool:
    """One policy (or ``FAMILY``) on the same devices, with batch sizes and decode iterations per
    encode within ``ALIKE`` of each other (RRA 29/32 and 31/32 at N_D 7, say; continuous 15 and
    mixed 16)."""

    def near(x: float, y: float) -> bool:
        return abs(x - y) <= ALIKE * max(x, y)

    family = FAMILY.get(a.policy, a.policy)
    return (
        family == FAMILY.get(b.policy, b.policy)
        and a.num_devices == b.num_devices
        and a.worker_devices == b.worker_devices
        and a.tp_degree == b.tp_degree
        and a.encoder_devices == b.encoder_devices
        and (a.chunk_tokens == b.chunk_tokens or a.policy != b.policy)
        and a.decode_microbatches == b.decode_microbatches
        and near(a.encode_batch, b.encode_batch)
        and near(a.decode_batch, b.decode_batch)
        and near(a.decode_iters_per_encode, b.decode_iters_per_encode)
    )


def sustains(sc: Scenario, schedule: Schedule, slo: Slo, fc: Forecast, rate: float, seed: int = 0) -> bool:
    """Whether ``schedule`` keeps the SLO's target attainment in the simulator at ``rate``, under
    arrivals of the forecast's burstiness."""
    requests = arrivals(sc.workload, Forecast(rate, fc.cv), seed)
    return figures(simulate(sc, schedule, tuple(requests)).records, slo).attainment >= slo.target - 1e-12


def sustained(
    sc: Scenario, schedule: Schedule, slo: Slo, fc: Forecast, seed: int = 0, steps: int = 5, beat: float = 0.0
) -> float:
    """The highest rate, to the forecast's / 2**steps, at which ``schedule`` ``sustains`` the SLO's
    target (bisection on [0, forecast rate]: attainment falls as the rate rises, up to the draws'
    noise); 0 when even the lowest rate tried misses it. ``beat``: a rate another candidate is
    known to sustain; NaN when this one does not (it cannot win), and no rate at or below it is
    simulated again. Half the forecast is taken as sustained until the upper half proves
    otherwise: it most often is, and the lower a rate, the more steps its simulation takes."""
    if beat > 0 and not sustains(sc, schedule, slo, fc, beat, seed):
        return math.nan
    lo, hi = 0.0, fc.rate_per_s
    unchecked = None  # half the forecast, taken as sustained without a simulation yet
    for step in range(steps):
        mid = (lo + hi) / 2
        if mid <= beat:
            lo = mid  # below a rate it sustains
        elif step == 0 and steps > 1:
            lo = unchecked = mid
        elif sustains(sc, schedule, slo, fc, mid, seed):
            lo, unchecked = mid, None  # a higher rate held: so does the half below it
        else:
            hi = mid
    if unchecked is not None and not sustains(sc, schedule, slo, fc, unchecked, seed):
        return sustained(sc, schedule, slo, Forecast(unchecked, fc.cv), seed, steps - 1)  # the lower half
    return lo
