"""The scheduler's planner: the optimizer run on this deployment's profile, cluster and live workers.

``Planner.plan`` searches (``optimizer.verify.verified_search``: the search's pick checked in the
simulator under saturated load) for a workload and a worker count, and, when nothing meets the
bound, falls back to the schedule with the least latency (``meets_bound`` False: the alert).
``Planner.evaluate`` simulates any schedule on the same probe load, so a new plan and the schedule
in force are compared on equal terms. Both are plain CPU work: the scheduler runs them in a thread.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.config import MeshConfig
from common.messages.status import CandidateFigures
from optimizer.analytic import Scenario
from optimizer.calibration import CalibrationTable
from optimizer.lengths import Workload, scaled_task
from optimizer.policies import RUNNABLE_POLICIES
from optimizer.schedule import Schedule
from optimizer.search import SearchSpace, least_latency
from optimizer.slo import Slo
from optimizer.traffic import SURGE, Forecast, TrafficPlan, Weighed, arrivals, plan_for_traffic, weigh, with_headroom
from optimizer.verify import ProbeLoad, requests_for, simulated_figures, verified_search
from services.schedules import wire_schedule

log = logging.getLogger(__name__)
PRIOR_SAMPLES = 500  # a prior workload's stand-in sample for the drift test's reference
HEADROOM = 1.25  # a schedule is to carry the arriving traffic at no more than 80 % of its throughput
SEED = 0  # probe loads are drawn with this seed: plans and evaluations see the same requests


@dataclass(frozen=True)
class Plan:
    """A schedule for a workload and a worker count, with its simulated figures (on the
    calibrated cost model) and the same plan's figures on the raw profile."""

    schedule: Schedule
    throughput_seq_s: float
    latency_s: float  # simulated p99-length latency (saturated closed loop)
    meets_bound: bool
    workers: int
    seconds: float  # the search's wall time
    searches: int
    rate_per_s: float = 0.0  # the forecast arrival rate planned for (0: planned saturated)
    cv: float = 1.0
    attainment: float = math.nan  # share of requests meeting the SLO at the forecast (NaN: saturated)
    ttft_s: float = math.nan  # at the SLO's percentiles, at the forecast
    tpot_s: float = math.nan
    pressure: float = math.nan  # the largest figure / bound over the SLO's bounds, at the forecast
    raw_throughput_seq_s: float = 0.0
    raw_latency_s: float = 0.0
    raw_attainment: float = math.nan
    calibration: CalibrationTable | None = None
    candidates: tuple[CandidateFigures, ...] = ()  # what the search weighed, the pick first


class PlanningError(ValueError):
    """The profile, cluster, model or prior cannot be used."""


POLICY_SETS = {
    "rra": ("rra",),
    "waa": ("waa-c", "waa-m"),
    "all": ("rra", "waa-c", "waa-m"),
    "static": ("static",),
    "continuous": ("continuous",),
    "mixed": ("mixed",),
    "any": ("rra", "waa-c", "waa-m", "static", "continuous", "mixed"),
}
DTYPE_BYTES = {
    "torch.float32": 4,
    "float32": 4,
    "torch.bfloat16": 2,
    "bfloat16": 2,
    "torch.float16": 2,
    "float16": 2,
}  # a profile header's dtype -> bytes per KV and weight element


def mesh_space(config: MeshConfig) -> SearchSpace:
    """The schedules the workers run as planned: batches within the workers' own caps
    (``max_encode_batch``, ``max_decode_batch``, which a follower would otherwise cut a plan to)
    and ``max_plan_batch``; every step whole (the workers do not split batches into
    micro-batches, so a schedule that does would be costed for a pipeline that does not run)."""
    top = min(config.max_plan_batch or config.max_decode_batch, config.max_decode_batch)
    space = SearchSpace().capped(top)
    encode = min(space.max_encode_batch, config.max_encode_batch)
    return replace(
        space,
        max_encode_batch=encode,
        waa_max_encode_batch=min(space.waa_max_encode_batch, encode),
        static_max_batch=min(space.static_max_batch, encode),  # these encode their whole batch
        continuous_max_batch=min(space.continuous_max_batch, encode),
        mixed_max_batch=min(space.mixed_max_batch, encode),
        microbatches=(1,),
        encode_microbatches=(1,),
    )


def policy_set(name: str) -> tuple[str, ...]:
    """The policies of the set ``name`` that workers can run (``RUNNABLE_POLICIES``): the planner
    searches these only, so no plan holds a schedule a worker cannot run."""
    if name not in POLICY_SETS:
        raise PlanningError(f"policies must be one of {', '.join(sorted(POLICY_SETS))}, got {name!r}")
    runnable = tuple(p for p in POLICY_SETS[name] if p in RUNNABLE_POLICIES)
    if not runnable:
        raise PlanningError(f"workers cannot run any policy of {name!r} ({', '.join(POLICY_SETS[name])})")
    return runnable


def cluster_named(name: str):
    """A cluster preset by name, or a cluster file."""
    from optimizer.cluster import CLUSTERS
    from optimizer.io import load_cluster

    if name in CLUSTERS:
        return CLUSTERS[name]
    if not Path(name).exists():
        raise PlanningError(f"unknown cluster {name!r}: not a preset ({', '.join(sorted(CLUSTERS))}) nor a file")
    return load_cluster(name)


def profiled_dtype_bytes(profile) -> int:
    """Bytes per element of the dtype the profile headers name (the engine ran that), else float32
    (the engine's CPU default)."""
    names = {row["dtype"] for row in profile.metadata if isinstance(row.get("dtype"), str)}
    return DTYPE_BYTES.get(names.pop(), 4) if len(names) == 1 else 4


def model_shape(name: str, dtype_bytes: int = 4):
    """The optimizer's shape of ``name``: a paper model from the table, else one of our models with
    its shape read from the model's configuration (GGUF metadata or config.json, no weights)."""
    from engine import MODELS as OUR_MODELS
    from engine.model_info import model_dimensions
    from optimizer.model import MODELS, ModelShape

    if name in MODELS:
        return MODELS[name]
    if name not in OUR_MODELS and not Path(name).expanduser().exists():
        raise PlanningError(
            f"unknown model {name!r}: not a paper model ({', '.join(sorted(MODELS))}) nor one of "
            f"ours ({', '.join(OUR_MODELS)}, a model folder or .gguf file)"
        )
    d = model_dimensions(name)
    return ModelShape(
        name,
        layers=d.layers,
        hidden=d.hidden,
        heads=d.heads,
        ffn=d.ffn,
        vocab=d.vocab,
        head_dim=d.head_dim,
        encoder_layers=d.encoder_layers,
        dtype_bytes=dtype_bytes,
        kv_heads=d.kv_heads,
        gated_ffn=d.gated_ffn,
    )


def prior_workload(prior: str, scale: float = 1.0) -> Workload:
    """A paper task's lengths (times ``scale``) or an empirical workload from a lengths CSV."""
    from optimizer.io import load_workload
    from optimizer.lengths import TASK_LENGTHS

    if prior in TASK_LENGTHS:
        return scaled_task(prior, scale)
    if not Path(prior).exists():
        raise PlanningError(f"prior {prior!r} is neither a task ({', '.join(TASK_LENGTHS)}) nor a lengths file")
    return load_workload(prior)


def reference_sample(workload: Workload, n: int = PRIOR_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Lengths drawn from ``workload``: what the drift test compares traffic with after a prior plan."""
    return workload.sample(np.random.default_rng(SEED), n)


class Planner:
    """Everything fixed about planning for one deployment: model shape, profile, cluster, policies."""

    def __init__(self, config: MeshConfig) -> None:
        from optimizer.io import load_profile

        if not config.profile:
            raise PlanningError("no profile: the scheduler cannot plan (set EXEGPT_PROFILE)")
        paths = [p.strip() for p in config.profile.split(",") if p.strip()]
        try:
            self.profile = load_profile(*paths)
            self.model = model_shape(config.model, profiled_dtype_bytes(self.profile))
            beside = Path(paths[0]).with_name(f"{Path(paths[0]).stem}-cluster.json")
            self.cluster = cluster_named(config.cluster or (str(beside) if beside.exists() else "h200-nvlink-ib"))
        except (OSError, ValueError) as exc:
            raise PlanningError(str(exc)) from None
        self.profile.layer_times(self.model.name, 1)  # raises when the model is not profiled
        self.policies = policy_set(config.policies)
        if self.cluster.handoff_note and {"waa-c", "waa-m"} & set(self.policies):
            log.warning("scheduler: %s", self.cluster.handoff_note)
        self.space = mesh_space(config)

    group: tuple[int, ...] | None = None  # the live workers' process group shape (heartbeats); None: one process

    @property
    def worker_devices(self) -> int:
        return sum(self.group) if self.group is not None else self.cluster.worker_devices

    def scenario(self, workload: Workload, workers: int, calibration: CalibrationTable | None = None) -> Scenario:
        try:
            return Scenario(
                self.model,
                self.profile,
                self.cluster,
                workload,
                max(workers, 1) * max(self.worker_devices, 1),
                self.group,
                calibration,
            )
        except ValueError as exc:
            raise PlanningError(str(exc)) from None

    def plan(
        self, workload: Workload, workers: int, latency_bound_s: float, calibration: CalibrationTable | None = None
    ) -> Plan:
        """The most throughput under the bound for ``workers`` workers (a saturated closed loop);
        else the least latency."""
        start = time.perf_counter()
        sc = self.scenario(workload, workers, calibration)
        verified = verified_search(sc, latency_bound_s, self.policies, self.space, seed=SEED)
        if verified.best is not None:
            sim = verified.simulated
            assert sim is not None  # a pick is always simulated
            schedule, thr, lat, meets = verified.best.schedule, sim.throughput_seq_s, sim.p99_length_latency_s, True
        else:
            quickest = least_latency(sc, self.policies, self.space).best
            if quickest is None:
                raise PlanningError(f"no schedule of {self.model.name} on {workers} worker(s) fits in memory")
            schedule = quickest.schedule
            thr, lat = self._simulate(sc, schedule)
            meets = lat <= latency_bound_s
        raw = self._simulate(self.scenario(workload, workers), schedule) if calibration is not None else (thr, lat)
        return Plan(
            schedule,
            thr,
            lat,
            meets,
            workers,
            time.perf_counter() - start,
            verified.searches,
            raw_throughput_seq_s=raw[0],
            raw_latency_s=raw[1],
            calibration=calibration,
        )

    def plan_for_traffic(
        self,
        workload: Workload,
        workers: int,
        slo: Slo,
        forecast: Forecast,
        current: Schedule | None = None,
        calibration: CalibrationTable | None = None,
        keep_capacity: bool = False,
        observed: Mapping[Schedule, float] | None = None,
    ) -> tuple[Plan, Weighed | None]:
        """The schedule with the best SLO attainment at ``forecast`` (``optimizer.traffic``), and
        the schedule in force weighed on the same arrivals (None when not comparable)."""
        start = time.perf_counter()
        sc = self.scenario(workload, workers, calibration)
        traffic = plan_for_traffic(
            sc,
            slo,
            forecast,
            self.policies,
            self.space,
            seed=SEED,
            current=current,
            keep_capacity=keep_capacity,
            observed=observed,
        )
        if traffic is None:
            raise PlanningError(f"no schedule of {self.model.name} on {workers} worker(s) fits in memory")
        best = traffic.best
        thr, lat = self._simulate(sc, best.schedule)
        raw_sc = self.scenario(workload, workers)
        raw_thr, raw_lat = self._simulate(raw_sc, best.schedule) if calibration is not None else (thr, lat)
        raw_att = (
            weigh(
                raw_sc, best.schedule, best.capacity_seq_s, arrivals(workload, with_headroom(forecast), SEED), slo
            ).attainment
            if calibration is not None
            else best.attainment
        )
        in_force = next((w for w in traffic.weighed if w.schedule == current), None)
        plan = Plan(
            best.schedule,
            thr,
            lat,
            traffic.reaches_target,
            workers,
            time.perf_counter() - start,
            traffic.searches,
            forecast.rate_per_s,
            forecast.cv,
            best.attainment,
            best.slo.ttft_s,
            best.slo.tpot_s,
            best.slo.pressure,
            raw_thr,
            raw_lat,
            raw_att,
            calibration,
            candidate_figures(traffic),
        )
        return plan, in_force

    def evaluate(
        self, schedule: Schedule, workload: Workload, workers: int, calibration: CalibrationTable | None = None
    ) -> tuple[float, float]:
        """(throughput, p99-length latency) of ``schedule`` on ``workload``, simulated as ``plan`` does."""
        return self._simulate(self.scenario(workload, workers, calibration), schedule)

    @staticmethod
    def _simulate(sc: Scenario, schedule: Schedule) -> tuple[float, float]:
        load = ProbeLoad.draw(sc.workload, requests_for(schedule), SEED)
        figures = simulated_figures(sc, schedule, load)
        return figures.throughput_seq_s, figures.p99_length_latency_s


TOP_CANDIDATES = 6  # candidates the state record keeps


def candidate_figures(traffic: TrafficPlan) -> tuple[CandidateFigures, ...]:
    return tuple(
        CandidateFigures(
            wire_schedule(w.schedule),
            w.capacity_seq_s,
            w.attainment,
            w.slo.ttft_s,
            w.slo.tpot_s,
            w.slo.e2e_p99_s,
            w.sustained_rate_s,
            w.schedule == traffic.best.schedule,
        )
        for w in traffic.weighed[:TOP_CANDIDATES]
    )


def better_for_traffic(new: Plan, current: Weighed | None, slo: Slo, margin: float) -> tuple[bool, str]:
    """Whether the traffic plan ``new`` should replace the schedule in force (``current``: weighed
    on the same forecast arrivals; None: nothing comparable runs). Only to mend a miss: a switch
    costs what the simulator does not see (running requests drained or re-queued, a new batch
    shape), so a schedule that meets the SLO at the forecast stays, however much slack another
    would have; one that misses it is replaced by one whose attainment is higher by more than
    ``margin`` of what it misses (and at least a tie), and, where the mesh measured the one in
    force below the model's figure, by more than the model overrated it. One exception: a schedule in force whose
    saturated capacity (where known) falls short of ``SURGE`` times the forecast is replaced by a
    pick that meets the SLO and has that headroom (the forecast lags a rise), and more than
    ``margin`` more capacity (a few per cent is within the model's error, and the switch is not
    free)."""
    if current is None:
        return True, "nothing comparable runs"
    at = f"at {new.rate_per_s:.3g} requests/s"
    if current.schedule == new.schedule:
        return False, f"the schedule in force is the best {at}"
    target, tie = slo.target - 1e-12, 0.003
    capacity = next((c.capacity_seq_s for c in new.candidates if c.schedule == wire_schedule(new.schedule)), 0.0)
    if (
        new.meets_bound
        and current.capacity_seq_s < new.rate_per_s * SURGE <= capacity
        and capacity > current.capacity_seq_s * (1 + margin)
    ):
        return True, (
            f"the schedule in force carries {current.capacity_seq_s:.3g} requests/s at most, short of "
            f"{SURGE:g}x the forecast {at}; the new one {capacity:.3g}"
        )
    if current.attainment >= target:
        return False, f"the schedule in force meets the SLO {at} ({current.attainment:.1%} of requests)"
    # measured short of the model: the model's figure for the pick is no surer by that much
    overrated = current.modelled - current.attainment if math.isfinite(current.modelled) else 0.0
    if new.attainment > current.attainment + max(tie, margin * (1 - current.attainment), overrated):
        return True, (
            f"the schedule in force would meet the SLO for {current.attainment:.1%} of requests {at}; "
            f"the new one for {new.attainment:.1%}"
        )
    return False, f"no schedule meets the SLO better {at} ({current.attainment:.1%})"


def better(
    new: Plan, current: tuple[float, float] | None, bound: float, margin: float, arrival_rate: float = 0.0
) -> tuple[bool, str]:
    """Whether ``new`` should replace the schedule in force, whose simulated (throughput, latency)
    on the same workload is ``current`` (None: nothing comparable runs), and why.

    Throughput and latency are a saturated closed loop's; ``arrival_rate`` (requests/s, 0:
    unknown) is the traffic seen. A plan that could not carry it with ``HEADROOM`` is not taken
    while the schedule in force can: under open-loop arrivals its queue would grow without end."""
    if current is None:
        return True, "nothing comparable runs"
    thr, lat = current
    need = arrival_rate * HEADROOM
    if new.throughput_seq_s < need <= thr:
        return False, (
            f"the new plan would not carry the traffic ({new.throughput_seq_s:.3g} seq/s at most, "
            f"{arrival_rate:.3g} requests/s arriving)"
        )
    meets = lat <= bound
    if new.meets_bound and not meets:
        return True, f"the schedule in force misses the bound ({lat:.3g} s > {bound:.3g} s)"
    if not new.meets_bound and not meets:
        if new.latency_s < lat * (1 - margin):
            return True, f"no schedule meets the bound; {new.latency_s:.3g} s instead of {lat:.3g} s"
        return False, "no schedule meets the bound, none quicker by the margin"
    if not new.meets_bound:
        return False, "the new plan misses the bound"
    if new.throughput_seq_s > thr * (1 + margin):
        gain = f" (+{new.throughput_seq_s / thr - 1:.0%})" if thr > 0 else ""
        return True, f"{new.throughput_seq_s:.3g} seq/s instead of {thr:.3g}{gain}"
    return False, f"within the margin ({new.throughput_seq_s:.3g} vs {thr:.3g} seq/s)"


def bound_text(bound: float) -> str:
    return "none" if math.isinf(bound) else f"{bound:g} s"
