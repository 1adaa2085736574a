"""Workers -> scheduler and observers (status exchange), and the records workers leave in the store."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerStatus:
    """Sent when a worker starts, applies a schedule version, and stops."""

    worker_id: str
    role: str
    schedule_version: int
    running: int  # requests in its batch right now
    state: str  # "ready" | "applied" | "stopping"
    at: float


@dataclass(frozen=True)
class LengthSample:
    """One finished request's lengths, pushed to the output-lengths list for the scheduler."""

    request_id: str
    input_len: int
    output_len: int
    finish_reason: str
    finished_at: float


StatusMessage = WorkerStatus
