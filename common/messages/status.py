"""Workers -> scheduler and observers (status exchange), and the records workers leave in the store."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.messages.schedule import ScheduleSpec

STEP_COSTS_PER_KIND = 8  # a heartbeat carries at most this many step records of each kind


@dataclass(frozen=True)
class StepCost:
    """One step as a worker measured it: its kind, its shape in the profile's terms
    (``optimizer.profile.StepShape``) and its seconds. The scheduler calibrates its cost model
    on these (``optimizer.calibration``)."""

    kind: str  # "prefill" | "decode" | "mixed"
    fused: bool  # costed as one pass over prompts and decode rows (optimizer.policies.fused_steps); else two
    prefill_seqs: int  # prompts (or prompt chunks) prefilled
    prefill_tokens: int
    prefill_seq: float  # their effective length for attention: sqrt of the mean squared length
    decode_seqs: int  # rows decoded, padding included
    decode_ctx: float  # mean KV length of the decoded requests
    seconds: float  # its interval in the worker's loop: from the previous step's end when the loop went
    # straight on (the boundary's work included), else from its own start
    at: float  # unix seconds when the step ended


@dataclass(frozen=True)
class WorkerStatus:
    """A worker's heartbeat: sent when it starts, applies a schedule version, every
    ``heartbeat_s`` while it runs, and when it stops. A worker silent for
    ``heartbeat_timeout_s`` is gone."""

    worker_id: str
    role: str  # "worker" | "encoder" | "decoder" | "idle"
    schedule_version: int
    running: int  # requests in its batch right now
    free_slots: int  # decode slots it could still fill (B_D - running)
    state: str  # "ready" | "alive" | "applied" | "draining" | "stopping"
    at: float
    engine_s: float = 0.0  # seconds its engine has spent in steps since it started (utilisation)
    steps: int = 0  # steps it has run since it started
    group: tuple[int, ...] = (1,)  # its process group: the TP degree of each pipeline stage
    # a sample of the steps run since the last report: at most STEP_COSTS_PER_KIND of each kind
    # (so a heartbeat stays small whatever the step rate), uniformly drawn among that kind's steps
    step_costs: tuple[StepCost, ...] = ()
    kv_tokens: int = 0  # KV positions its running requests hold
    kv_used_bytes: float = 0.0  # those positions' bytes (0: unknown)
    kv_allocated_bytes: float = 0.0  # its KV cache's allocation (0: unknown)
    # the batch sizes it runs, (B_E, B_D): the schedule's within its memory guard (max_encode_batch,
    # max_decode_batch), so below the schedule's where the guard caps them; (0, 0): unknown
    applied_batch: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class LengthSample:
    """One finished request: its lengths, lifecycle stamps and the schedule that ran it, pushed
    to the output-lengths list for the scheduler (and benchmarks)."""

    request_id: str
    input_len: int
    output_len: int
    finish_reason: str
    finished_at: float  # unix seconds, like every stamp here
    submitted_at: float = 0.0  # arrival at the encode queue
    encode_start_at: float = 0.0
    first_token_at: float = 0.0
    schedule_version: int = 0
    worker: str = ""  # the worker that produced its last token


@dataclass(frozen=True)
class SchedulerState:
    """What the active scheduler decided and why, kept in the store (``names.scheduler_state``)
    for the admin API and the metrics: the schedule version in force, the statistics it was
    planned on, its predicted figures beside the observed ones, and the drift test's latest result.

    Quantiles are (p50, p90, p99) in tokens; rates per second; latencies in seconds (math.inf:
    unbounded or unknown); ``observed_*`` are 0 until requests finish under the version."""

    leader: str  # the scheduler's process id
    token: int  # its fencing token
    version: int  # the schedule version in force
    policy: str
    pinned: bool  # an operator pinned the schedule (its allocation still follows the workers)
    latency_bound_s: float
    meets_bound: bool  # False raises the alert: no schedule met the bound, the least-latency one runs
    basis: str  # what the schedule was planned on: "prior: task S x0.25", "observed: 312 requests", ...
    samples: int  # finished requests the statistics hold (decayed weight, rounded)
    input_quantiles: tuple[float, ...]
    output_quantiles: tuple[float, ...]
    input_mean: float
    output_mean: float
    correlation: float  # of input and output lengths
    arrival_rate_s: float
    arrival_cv: float  # coefficient of variation of inter-arrival gaps (1: Poisson; more: bursty)
    predicted_throughput_seq_s: float
    predicted_latency_s: float  # p99-length latency the plan predicts
    observed_throughput_seq_s: float
    observed_latency_s: float  # p99 of end-to-end latency over the statistics' window
    drift_statistic: float  # the two-sample test's statistic at the last check (0: not tested)
    drift_p_value: float
    replans: int  # searches run since this scheduler took the lead
    last_replan_reason: str
    last_replan_at: float
    workers: int  # live workers the allocation covers
    updated_at: float
    last_outcome: str = ""  # what the last search decided: "published: ..." or "kept the schedule: ..."
    # the SLO in force besides latency_bound_s (the end-to-end bound): inf where not set
    ttft_bound_s: float = math.inf
    ttft_percentile: float = 0.99
    tpot_bound_s: float = math.inf
    tpot_percentile: float = 0.99
    forecast_rate_s: float = 0.0  # arrivals per second the plan is made for (0: unknown: saturated)
    forecast_cv: float = 1.0
    # the plan's figures at the forecast load (NaN: planned saturated); observed over the last 30 s
    predicted_attainment: float = math.nan
    predicted_ttft_s: float = math.nan
    predicted_tpot_s: float = math.nan
    observed_attainment: float = math.nan
    observed_ttft_s: float = math.nan  # at the SLO's TTFT percentile
    observed_tpot_s: float = math.nan
    # the same plan predicted on the raw profile (no calibration), and the correction in force
    raw_predicted_throughput_seq_s: float = 0.0
    raw_predicted_latency_s: float = 0.0
    raw_predicted_attainment: float = math.nan
    calibration: tuple[CalibrationPoint, ...] = ()
    calibration_samples: int = 0  # steps the correction is fitted on (decayed weight)
    candidates: tuple[CandidateFigures, ...] = ()  # what the last search weighed, the pick first
    # (p50, p90, p99) of the lengths the plan in force was made on, beside the current ones above
    planned_input_quantiles: tuple[float, ...] = ()
    planned_output_quantiles: tuple[float, ...] = ()
    last_search_s: float = 0.0  # the last search's wall time in the scheduler's search thread


@dataclass(frozen=True)
class CalibrationPoint:
    """The correction of one kind of step around one size: measured / profiled seconds."""

    kind: str
    tokens: float
    factor: float


@dataclass(frozen=True)
class CandidateFigures:
    """A schedule the last search weighed, and its simulated figures at the forecast load."""

    schedule: ScheduleSpec
    capacity_seq_s: float  # saturated throughput the search predicts (inf: unknown)
    attainment: float  # share of requests meeting the SLO at the forecast (NaN: planned saturated)
    ttft_s: float
    tpot_s: float
    e2e_p99_s: float
    sustained_rate_s: float  # NaN unless no candidate reached the target
    chosen: bool


StatusMessage = WorkerStatus
