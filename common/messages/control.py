"""Scheduler and gateways -> every worker, on the control fanout exchange."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulePlan:
    """The control variables (mirrors optimizer.schedule.Schedule field for field)."""

    policy: str
    encode_batch: int
    decode_batch: int
    decode_microbatches: int
    decode_iters_per_encode: int
    tp_degree: int
    tp_stages: int
    num_devices: int
    encoder_devices: int
    decoder_devices: int


@dataclass(frozen=True)
class ScheduleUpdate:
    """Schedule ``version`` replaces every older one at the workers' next iteration boundary."""

    version: int
    plan: SchedulePlan
    published_at: float


@dataclass(frozen=True)
class Abort:
    """The client went away: drop the request wherever it is."""

    request_id: str


ControlMessage = ScheduleUpdate | Abort
