"""What the scheduler learns and decides: statistics of finished requests → drift → a new plan.

The scheduler feeds ``Brain`` the workers' finish records (``LengthSample``; only finished
requests: a queued request's ``max_tokens`` is never read) and the live worker count; ``Brain``
keeps the decaying statistics (``optimizer.stats.StreamingStats``), runs the drift test on the
requests finished since the last plan against the sample that plan was made on
(``optimizer.drift.DriftMonitor``), and says when to search again and why:

- ``cold start``: at start, from the configured prior (a paper task or a lengths file);
  without one, once the first ``drift_min_samples`` requests finished;
- ``drift``: the two-sample test fired (``confirm`` significant checks in a row, at least
  ``replan_interval_s`` after the last plan);
- ``workers``: the live worker count differs from the one the schedule in force was planned for;
- ``rate`` / ``burstiness`` / ``calibration`` / ``observed`` (see ``docs/scheduler.md``): the forecast
  arrival rate or burstiness, the calibrated step times or the observed attainment moved from what
  the plan was made for
  (a rise of the rate at once; the rest at least ``replan_interval_s`` after the last search);
- ``asked`` / ``bound``: the admin API forced a search or changed the latency bound.

``decide`` runs the search (plain CPU work, in a thread) and says whether to publish: a new plan
replaces the schedule in force only when it beats it, simulated on the same workload, by
``replan_margin`` in throughput (or the one in force misses the bound), and never when it could
not carry the arriving traffic while the one in force can; a cold start and a worker-count change
always publish. A pinned schedule is never replaced by a plan (its allocation still follows
the workers). Without a profile the scheduler learns and reports but never plans.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from common.config import MeshConfig
from common.messages.status import LengthSample, SchedulerState
from optimizer.calibration import IDENTITY, CalibrationTable
from optimizer.drift import DriftMonitor, DriftResult
from optimizer.lengths import Workload
from optimizer.schedule import Schedule
from optimizer.slo import Slo, SloFigures, figures
from optimizer.stats import StreamingStats
from optimizer.traffic import SHORT_S, Forecast, Weighed, forecast
from services.scheduler.calibrate import StepCalibrator, points
from services.scheduler.planning import Plan, Planner, better, better_for_traffic, prior_workload, reference_sample
from services.schedules import wire_schedule

SEEN_MAX = 20_000  # request ids remembered to skip finish records already counted
WINDOW_MAX = 500  # newest finished requests since the last plan that a search on observations uses
DRIFT_WINDOW = 50  # newest finished requests since the last plan that the drift test compares
DRIFT_PLAN = 25  # newest complete requests a search after drift plans on (the shift's own requests:
# a longer window would mix in the requests from before it, still finishing when the test fires)
REFINE_AT = 60  # a plan on fewer observed requests is made again once this many more are complete
OBSERVED_WINDOW_S = 30.0  # observed throughput: finished requests per second over this window
FINISHED = ("stop", "length")  # finish reasons that say how long a request really was
CHECK_EVERY = 5  # new finished requests between two drift checks
TAIL_TRUSTED = 2000  # observed requests whose own 99th percentile a plan takes as it is
NORMAL_P99 = 2.326  # standard normal 99th percentile
TIMED_MAX = 2048  # newest finished requests whose TTFT/TPOT the observed SLO figures read
CALIBRATION_CHANGE = 0.15  # a step's calibrated time this far from the one the plan used: search again
OBSERVED_GAP = 0.05  # observed attainment this far below the predicted one: search again
# a schedule measured short of its prediction is weighed at what was measured for this long (then
# the model is believed again: the shortfall may have been a backlog another schedule left)
SHORTFALL_MEMORY_S = 60.0
OBSERVED_MIN = 40  # ... once this many requests finished under the plan
# the forecast burstiness this far (times the planned CV, at least 1) from the one the plan was made for:
# search again (the same rate with gaps of CV 3 needs far more headroom than Poisson arrivals)
BURST_CHANGE = 0.5
SAME_LENGTHS = ("rate", "burstiness", "calibration", "observed", "slo")  # searches that leave the drift
# test's window as it is


@dataclass(frozen=True)
class Timed:
    """A finished request's stamps, in the shape ``optimizer.slo`` reads."""

    arrival_s: float
    first_token_s: float
    finish_s: float
    output_len: int


@dataclass(frozen=True)
class Decision:
    """A search's outcome: the plan, whether it replaces the schedule in force, and why."""

    plan: Plan
    publish: bool
    why: str
    reason: str  # what triggered the search
    basis: str  # what it was planned on
    workload: Workload
    reference: tuple[np.ndarray, np.ndarray]  # the lengths it was planned on (the drift test's reference)
    in_force: Weighed | None = None  # the schedule in force, weighed at the same forecast (arrival plans)
    seconds: float = 0.0  # the search's wall time


class Brain:
    def __init__(self, config: MeshConfig, planner: Planner | None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.config = config
        self.planner = planner
        self.slo = Slo(
            config.latency_bound_s,
            config.slo_ttft_s,
            config.slo_ttft_percentile,
            config.slo_tpot_s,
            config.slo_tpot_percentile,
        )
        self.calibrator = (
            StepCalibrator(planner, config.calibration_half_life_s)
            if planner is not None and config.calibrate
            else None
        )
        self.forecast = Forecast(0.0, 1.0)
        self.timed: deque[Timed] = deque(maxlen=TIMED_MAX)
        self._observed_fired = False  # the observed-vs-predicted trigger fired for the plan in force
        self._ran_since = now  # when the schedule in force took effect: what it is measured on arrived since
        # schedules the mesh measured short of their prediction: (attainment measured, when); replaced
        # whole, never changed in place (a search reads it in a thread)
        self.shortfalls: dict[Schedule, tuple[float, float]] = {}
        self.stats = StreamingStats(half_life_s=config.stats_half_life_s)
        self.monitor = DriftMonitor(
            alpha=config.drift_alpha,
            min_samples=config.drift_min_samples,
            confirm=2,
            min_interval_s=config.replan_interval_s,
        )
        self.prior: Workload | None = prior_workload(config.prior, config.prior_scale) if config.prior else None
        self.plan: Plan | None = None  # the plan in force (None: the default or a pinned schedule runs)
        self.basis = "no plan yet"
        self.rebased_at = now  # the drift test's window: requests finished since then
        self.forced: str | None = None  # a search the admin API asked for
        self._planned: tuple[Workload, str, tuple[np.ndarray, np.ndarray]] | None = None
        self.drift: DriftResult | None = None
        self.replans = 0
        self.last_reason, self.last_at, self.last_outcome = "", 0.0, ""
        self.last_noted_at = 0.0  # the last search, or the last asked one that could not run
        self.last_search_s = 0.0  # the last search's wall time
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._checked_at = 0  # window size at the last drift check
        self._drifted = False  # the drift test fired since the last plan
        self._refine = False  # the plan in force was made on few observed requests: make it again on more
        self._lengths_since = 0.0  # requests finished since the last drift search: the lengths searches plan on

    # --- learn ----------------------------------------------------------------------------------
    def ingest(self, samples: list[LengthSample]) -> int:
        """Count the finish records not seen before; returns how many were new."""
        new = 0
        for s in samples:
            if s.request_id in self._seen:
                continue
            self._seen[s.request_id] = None
            if len(self._seen) > SEEN_MAX:
                self._seen.popitem(last=False)
            if s.finish_reason not in FINISHED or s.input_len < 1 or s.output_len < 1:
                continue
            submitted = s.submitted_at or s.finished_at
            self.stats.observe(s.input_len, s.output_len, submitted, s.finished_at)
            if s.first_token_at:
                self.timed.append(Timed(submitted, s.first_token_at, s.finished_at, s.output_len))
            new += 1
        return new

    @property
    def bound(self) -> float:
        """The end-to-end bound (the paper's, for a p99-length request)."""
        return self.slo.e2e_s

    def observe_arrivals(self, counts_per_s: Sequence[float], now: float) -> Forecast:
        """Arrivals counted per second by the gateways (oldest first, the second under way left
        out): the forecast the next search plans for (``optimizer.traffic.forecast``)."""
        self.forecast = forecast(counts_per_s, self.stats.summary(now).arrival_cv)
        return self.forecast

    def calibration(self, now: float) -> CalibrationTable:
        return self.calibrator.table(now) if self.calibrator is not None else IDENTITY

    def observed_slo(self, now: float, arrived_since: float = -math.inf) -> SloFigures:
        """The SLO figures of requests finished in the last ``OBSERVED_WINDOW_S`` (of those that
        arrived at ``arrived_since`` or later)."""
        start = now - OBSERVED_WINDOW_S
        return figures([t for t in self.timed if t.finish_s >= start and t.arrival_s >= arrived_since], self.slo)

    def seen(self, request_id: str) -> bool:
        return request_id in self._seen

    def window(self, newest: int = WINDOW_MAX) -> tuple[np.ndarray, np.ndarray]:
        """Lengths of the newest requests (at most ``newest``) finished since the last plan."""
        rows = self.stats.since(self.rebased_at)
        return rows.input_len[-newest:], rows.output_len[-newest:]

    # --- when to search -------------------------------------------------------------------------
    def trigger(self, workers: int, pinned: bool, now: float) -> str | None:
        """Why to search now (None: no need). Before a search, what the mesh measured of the
        schedule in force is noted (``shortfalls``), so the search weighs it at that."""
        reason = self._why(workers, pinned, now)
        if reason == "drift":
            # the lengths moved: what was measured on the old ones says nothing of the new (seen: RRA
            # 32/32, measured at 72 % in a heavy phase of task S, replaced at task T by a small batch
            # that met 17 % of the bursty phase after it, which RRA 32/32 met at 89 %)
            self.shortfalls = {}
            return reason
        if self.shortfalls:
            self.shortfalls = {s: v for s, v in self.shortfalls.items() if now - v[1] <= SHORTFALL_MEMORY_S}
        if reason is not None and self.plan is not None and not self._observed_fired:
            self._shortfall(self.plan, now)
        return reason

    def _why(self, workers: int, pinned: bool, now: float) -> str | None:
        finished = len(self.stats.since(self.rebased_at).finished_at)
        if finished - self._checked_at >= CHECK_EVERY:
            self._checked_at = finished
            self.drift = self.monitor.check(*self.window(DRIFT_WINDOW), now)
            self._drifted = self._drifted or self.drift.fired
        if self.planner is None or pinned or workers < 1:
            if self.forced:  # asked through the admin API: say why nothing was searched
                why = (
                    "no profile to plan on (set EXEGPT_PROFILE)"
                    if self.planner is None
                    else "the schedule is pinned (unpin it to plan)"
                    if pinned
                    else "no worker has reported yet"
                )
                self.last_reason, self.last_outcome, self.last_noted_at = self.forced, f"not searched: {why}", now
            self.forced = None
            return None
        if self.forced:
            return self.forced
        complete = len(self.cohort(now)[0])
        enough = complete >= self.config.drift_min_samples
        plan = self.plan
        if plan is None:
            if self.prior is not None:
                return "cold start (prior)"
            return "cold start (observed)" if enough else None
        if plan.workers != workers:
            return f"workers {plan.workers} -> {workers}"
        if self._drifted and enough:
            return "drift"
        # a drift that waits for the shift's own requests to complete (a backlog can make that
        # long) does not hold back the other reasons: a search for them keeps the drift pending
        if self._refine and complete >= REFINE_AT and not self._drifted:
            return "refine"
        # a rise is met at once (the queue grows while the interval runs), unless the plan in force
        # fell short of the SLO's target at its own rate: a search then mostly confirms it, and at an
        # overload forecast a search costs the most CPU, which serving needs on a shared host
        rise = self._rate_trigger(plan, rising=True) if plan.meets_bound else None
        if rise:
            return rise
        if now - self.last_at < self.config.replan_interval_s:
            return None
        return (
            self._rate_trigger(plan)
            or self._burst_trigger(plan)
            or self._calibration_trigger(plan, now)
            or self._observed_trigger(plan, now)
        )

    def _rate_trigger(self, plan: Plan, rising: bool = False) -> str | None:
        """The forecast rate moved by ``rate_change`` from the one the plan was made for, and by
        more than three deviations of a short window's mean at that rate under the forecast burstiness (or
        traffic came to a plan made saturated); ``rising``: only a move up."""
        if self.config.plan_for != "arrivals":
            return None
        rate, planned = self.forecast.rate_per_s, plan.rate_per_s
        # arrivals counted over SHORT_S of a renewal process: variance ~ cv^2 x the mean count, so a
        # burst of gamma arrivals at cv 3 moves the short mean three times as far as Poisson ones;
        # the noise is that of the rate planned for (the test's null), not the one seen: a rise from
        # 3.4 to 10 requests/s then shows about 2 s into it, not 4
        noise = 3 * max(self.forecast.cv, 1.0) * math.sqrt((planned if planned > 0 else rate) / SHORT_S)
        moved = rate - planned if rising else abs(rate - planned)
        if rate > 0 and (planned <= 0 or moved > max(self.config.rate_change * planned, noise)):
            return f"rate {planned:.3g} -> {rate:.3g} requests/s"
        return None

    def _burst_trigger(self, plan: Plan) -> str | None:
        """The forecast burstiness (CV of the gaps between arrivals) moved by ``BURST_CHANGE`` times
        the planned one (at least 1) from the one the plan was made for."""
        if self.config.plan_for != "arrivals" or not self.forecast.known:
            return None
        cv, planned = self.forecast.cv, plan.cv
        if math.isfinite(cv) and math.isfinite(planned) and abs(cv - planned) > BURST_CHANGE * max(planned, 1.0):
            return f"burstiness: CV {planned:.2g} -> {cv:.2g}"
        return None

    def _calibration_trigger(self, plan: Plan, now: float) -> str | None:
        """The calibrated time of the plan's typical decode and prefill steps moved by
        ``CALIBRATION_CHANGE`` from the correction the plan was made with."""
        if self.calibrator is None:
            return None
        before, after = plan.calibration or IDENTITY, self.calibration(now)
        s = plan.schedule
        steps = (("decode", max(s.mean_decode_batch, 1.0)), ("prefill", max(s.mean_input_len, 1.0) * s.encode_batch))
        for kind, tokens in steps:
            old, new = before.scalar(kind, tokens), after.scalar(kind, tokens)
            if abs(new / old - 1) > CALIBRATION_CHANGE:
                return f"calibration: {kind} steps x{old:.2f} -> x{new:.2f}"
        return None

    def _observed_trigger(self, plan: Plan, now: float) -> str | None:
        """Under the plan, observed attainment fell ``OBSERVED_GAP`` below the predicted one
        (once per plan)."""
        if self._observed_fired:
            return None
        measured = self._shortfall(plan, now)
        if measured is None:
            return None
        self._observed_fired = True
        return f"observed attainment {measured:.1%} < predicted {plan.attainment:.1%}"

    def _shortfall(self, plan: Plan, now: float) -> float | None:
        """The attainment measured under the schedule in force, when ``OBSERVED_MIN`` requests that
        arrived since it took effect finished in the window and it fell ``OBSERVED_GAP`` short of
        the prediction (then remembered in ``shortfalls``); else None."""
        if not math.isfinite(plan.attainment):
            return None
        seen = self.observed_slo(now, arrived_since=self._ran_since)
        if seen.requests < OBSERVED_MIN or seen.attainment >= plan.attainment - OBSERVED_GAP:
            return None
        self.shortfalls = {**self.shortfalls, plan.schedule: (seen.attainment, now)}
        return seen.attainment

    def cohort(self, now: float, since: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Lengths of the requests finished since the last plan that were submitted early enough
        for all their peers to have finished too (before ``now`` minus the 99th-percentile latency
        of those finished), in order of submission. Requests that finish first are the short ones:
        right after a change the newest finished are a sample biased short; the complete cohort
        much less so (it is still short of the longest ones, which the p99 of what finished
        does not see)."""
        rows = self.stats.since(self.rebased_at if since is None else since)
        if not len(rows.finished_at):
            return rows.input_len, rows.output_len
        horizon = now - float(np.quantile(rows.finished_at - rows.submitted_at, 0.99))
        keep = rows.submitted_at <= horizon
        order = np.argsort(rows.submitted_at[keep], kind="stable")
        return rows.input_len[keep][order], rows.output_len[keep][order]

    def ask(self, reason: str) -> None:
        self.forced = reason

    def set_bound(self, bound: float) -> None:
        self.slo = replace(self.slo, e2e_s=bound)
        self.forced = f"bound {bound:g} s"

    def set_slo(self, slo: Slo) -> None:
        """New TTFT and TPOT bounds (the end-to-end bound is kept)."""
        self.slo = replace(slo, e2e_s=self.slo.e2e_s)
        self.forced = f"slo {self.slo.describe()}"

    # --- search (in a thread) -------------------------------------------------------------------
    def inputs(self, reason: str, now: float) -> tuple[Workload, str, tuple[np.ndarray, np.ndarray]]:
        """What to plan on: the newest complete requests since the last plan when there are enough
        (after drift, only the newest ``DRIFT_PLAN``: those of the shift), else the workload the
        plan in force was made on, else the prior, else the newest observed."""
        # after drift, only requests since the last plan (the new traffic); otherwise the lengths
        # have not changed since the last drift search as far as the test can tell, and every
        # request complete since then counts (not those before it: seen, a refine after a drift to
        # task T planned on 357 requests, more than half of them the task S ones before the drift)
        ins, outs = self.cohort(now) if reason == "drift" else self.cohort(now, since=self._lengths_since)
        newest = DRIFT_PLAN if reason == "drift" else WINDOW_MAX
        ins, outs = ins[-newest:], outs[-newest:]
        if len(ins) >= min(self.config.drift_min_samples, DRIFT_PLAN):
            return observed_workload(ins, outs), f"observed: {len(ins)} requests", (ins, outs)
        if self._planned is not None:
            return self._planned
        if self.prior is not None:
            return (
                self.prior,
                f"prior: {self.config.prior}"
                + (f" x{self.config.prior_scale:g}" if self.config.prior_scale != 1 else ""),
                reference_sample(self.prior),
            )
        ins, outs = self.stats.recent(WINDOW_MAX)
        if len(ins) == 0:
            raise ValueError("nothing to plan on: no prior and no finished requests")
        return observed_workload(ins, outs), f"observed: {len(ins)} requests", (ins, outs)

    def decide(
        self,
        reason: str,
        workers: int,
        running: Schedule,
        inputs: tuple[Workload, str, tuple[np.ndarray, np.ndarray]],
        arrival_rate: float = 0.0,
    ) -> Decision:
        """Search for ``workers`` workers on ``inputs`` (from ``inputs``, taken on the event loop)
        and compare with ``running``, the schedule in force, under ``arrival_rate`` (requests/s
        seen). Reads nothing that ``ingest`` changes: safe in a thread. The decision carries the
        search's wall time: where the scheduler shares cores with busy workers it is several times
        the search's CPU time, and it is most of a re-plan's lag."""
        start = time.perf_counter()
        decision = self._decide(reason, workers, running, inputs, arrival_rate)
        return replace(decision, seconds=time.perf_counter() - start)

    def _decide(
        self,
        reason: str,
        workers: int,
        running: Schedule,
        inputs: tuple[Workload, str, tuple[np.ndarray, np.ndarray]],
        arrival_rate: float,
    ) -> Decision:
        assert self.planner is not None
        workload, basis, reference = inputs
        table = self.calibration(time.time())
        comparable = for_workers(running, workers, self.planner.worker_devices)
        if reason.startswith(("workers", "cold start")):
            comparable = None
        if self.forecast.known and self.config.plan_for == "arrivals":
            # no smaller schedule than the one in force while the rate has not fallen since it was
            # planned, nor after the mesh measured it short of its prediction (arrivals that fall
            # while a backlog drains are no less load; a smaller batch has less room, not more);
            # every schedule measured short lately is weighed at what was measured
            shortfalls = {s: attained for s, (attained, _) in self.shortfalls.items()}
            short = self.plan is not None and self.plan.schedule in shortfalls
            keep = self.plan is not None and (short or self.forecast.rate_per_s >= self.plan.rate_per_s > 0)
            plan, in_force = self.planner.plan_for_traffic(
                workload,
                workers,
                self.slo,
                self.forecast,
                comparable,
                table,
                keep_capacity=keep,
                observed=shortfalls or None,
            )
            publish, why = better_for_traffic(
                plan, in_force if comparable is not None else None, self.slo, self.config.replan_margin
            )
            return Decision(plan, publish, why, reason, basis, workload, reference, in_force)
        plan = self.planner.plan(workload, workers, self.bound, table)
        current = self.planner.evaluate(comparable, workload, workers, table) if comparable is not None else None
        publish, why = better(plan, current, self.bound, self.config.replan_margin, arrival_rate)
        return Decision(plan, publish, why, reason, basis, workload, reference)

    def adopt(self, decision: Decision, now: float) -> None:
        """The search is done: its plan is in force if published; either way the drift test
        starts again from the sample it was planned on, unless the search was for something
        other than the lengths (``SAME_LENGTHS``): frequent searches for the rate or the machine
        must not keep the drift test from ever filling its window."""
        self.replans += 1
        self.last_reason, self.last_at, self.last_search_s = decision.reason, now, decision.seconds
        self.last_noted_at = now
        self.last_outcome = (
            f"{'published' if decision.publish else 'kept the schedule'}: {decision.why} (planned on {decision.basis})"
        )
        if decision.reason == self.forced or decision.reason.startswith(("bound", "slo")):
            self.forced = None
        if decision.publish or self.plan is None:
            if self.plan is None or decision.plan.schedule != self.plan.schedule:
                self._ran_since = now  # a new schedule: measured on what arrives from now on
            self.plan = decision.plan
            self.basis = decision.basis
            self._planned = (decision.workload, decision.basis, decision.reference)
        else:  # kept: what it was weighed for is now what it runs for (the triggers compare with that)
            new, w = decision.plan, decision.in_force
            self.plan = replace(
                self.plan,
                workers=new.workers,
                rate_per_s=new.rate_per_s,
                cv=new.cv,
                calibration=new.calibration,
                candidates=new.candidates,
            )
            if w is not None:
                self.plan = replace(
                    self.plan,
                    attainment=w.attainment,
                    ttft_s=w.slo.ttft_s,
                    tpot_s=w.slo.tpot_s,
                    pressure=w.slo.pressure,
                )
        runs = self.plan.schedule  # the candidates as the state record shows them: what runs first, marked
        marked = [replace(c, chosen=c.schedule == wire_schedule(runs)) for c in self.plan.candidates]
        self.plan = replace(self.plan, candidates=tuple(sorted(marked, key=lambda c: not c.chosen)))
        self._observed_fired = False
        if decision.reason.startswith(SAME_LENGTHS):
            return  # a search for the rate, the machine or the SLO: the drift test's window goes on
        self.monitor.rebase(*decision.reference, now)
        self.rebased_at, self._checked_at, self._drifted = now, 0, False
        if decision.reason == "drift":
            self._ran_since = now  # the schedule in force is measured on the new lengths only
            self._lengths_since = now  # and the searches after this one plan on them only
        self._refine = decision.basis.startswith("observed") and len(decision.reference[0]) < REFINE_AT

    # --- report ---------------------------------------------------------------------------------
    def state(
        self, *, leader: str, token: int, version: int, schedule: Schedule, pinned: bool, workers: int, now: float
    ) -> SchedulerState:
        s = self.stats.summary(now)
        plan = self.plan if not pinned else None
        drift = self.drift
        seen, table = self.observed_slo(now), self.calibration(now)
        return SchedulerState(
            leader=leader,
            token=token,
            version=version,
            policy=schedule.policy,
            pinned=pinned,
            latency_bound_s=self.bound,
            meets_bound=plan.meets_bound if plan else True,
            basis="pinned" if pinned else self.basis,
            samples=int(round(s.samples)),
            input_quantiles=tuple(float(q) for q in (s.input.p50, s.input.p90, s.input.p99)),
            output_quantiles=tuple(float(q) for q in (s.output.p50, s.output.p90, s.output.p99)),
            input_mean=_finite(s.input.mean),
            output_mean=_finite(s.output.mean),
            correlation=_finite(s.correlation),
            arrival_rate_s=_finite(s.arrival_rate_per_s),
            arrival_cv=_finite(s.arrival_cv),
            predicted_throughput_seq_s=plan.throughput_seq_s if plan else 0.0,
            predicted_latency_s=plan.latency_s if plan else 0.0,
            observed_throughput_seq_s=self.stats.throughput(now, OBSERVED_WINDOW_S),
            observed_latency_s=_finite(self.stats.latency_quantile(0.99)),
            drift_statistic=_finite(drift.statistic) if drift else 0.0,
            drift_p_value=drift.p_value if drift else 1.0,
            replans=self.replans,
            last_replan_reason=self.last_reason,
            last_replan_at=self.last_noted_at,
            workers=workers,
            updated_at=now,
            last_outcome=self.last_outcome,
            ttft_bound_s=self.slo.ttft_s,
            ttft_percentile=self.slo.ttft_percentile,
            tpot_bound_s=self.slo.tpot_s,
            tpot_percentile=self.slo.tpot_percentile,
            forecast_rate_s=self.forecast.rate_per_s,
            forecast_cv=self.forecast.cv,
            predicted_attainment=plan.attainment if plan else math.nan,
            predicted_ttft_s=plan.ttft_s if plan else math.nan,
            predicted_tpot_s=plan.tpot_s if plan else math.nan,
            observed_attainment=seen.attainment,
            observed_ttft_s=seen.ttft_s,
            observed_tpot_s=seen.tpot_s,
            raw_predicted_throughput_seq_s=plan.raw_throughput_seq_s if plan else 0.0,
            raw_predicted_latency_s=_finite(plan.raw_latency_s) if plan else 0.0,
            raw_predicted_attainment=plan.raw_attainment if plan else math.nan,
            calibration=points(table),
            calibration_samples=table.samples,
            candidates=self.plan.candidates if self.plan else (),
            planned_input_quantiles=self._planned_quantiles("input"),
            planned_output_quantiles=self._planned_quantiles("output"),
            last_search_s=self.last_search_s,
        )

    def _planned_quantiles(self, side: str) -> tuple[float, ...]:
        if self._planned is None:
            return ()
        lengths = getattr(self._planned[0], side)
        return tuple(float(lengths.quantile(q)) for q in (0.5, 0.9, 0.99))


def observed_workload(ins: np.ndarray, outs: np.ndarray) -> Workload:
    """The workload of observed requests, its 99th percentiles kept from falling short on a small
    sample: where mean + 2.33 std (the normal 99th percentile) lies above the sample's own, enough
    requests at that input and output length are added to make it the 99th percentile. (The
    search's latency is that of a 99th-percentile-length request, which a sample of a few dozen
    puts at its maximum: too low, about as often as not.)"""
    ins, outs = np.asarray(ins), np.asarray(outs)
    if len(ins) >= TAIL_TRUSTED:
        return Workload.from_pairs("observed", ins, outs)
    tail = [int(math.ceil(max(np.quantile(x, 0.99), x.mean() + NORMAL_P99 * x.std()))) for x in (ins, outs)]
    extra = int(math.ceil(0.01 * len(ins))) + 1
    return Workload.from_pairs(
        "observed", np.concatenate([ins, np.full(extra, tail[0])]), np.concatenate([outs, np.full(extra, tail[1])])
    )


def for_workers(schedule: Schedule, workers: int, worker_devices: int) -> Schedule | None:
    """``schedule`` as it runs on ``workers`` workers of ``worker_devices`` devices each: replicas
    scale with the count; a WAA split or one pipeline over all devices compares only on the device
    count it was planned for (None otherwise)."""
    devices = workers * max(worker_devices, 1)
    if schedule.split or not schedule.worker_devices:
        return schedule if schedule.num_devices == devices else None
    if devices % schedule.worker_devices:
        return None
    return replace(schedule, num_devices=devices)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0
