"""Workers -> scheduler and observers (status exchange), and the records workers leave in the store."""

from __future__ import annotations

from dataclasses import dataclass


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


StatusMessage = WorkerStatus
