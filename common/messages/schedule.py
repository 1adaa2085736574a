"""The execution schedule as the mesh carries it: in a ``ScheduleUpdate`` to the workers, a
``PinSchedule`` to the scheduler and the ``SchedulerState`` it records.

Plain data with the planner's fields (``optimizer.schedule.Schedule`` documents each); the
services convert at their boundaries (``services.schedules``), where the optimizer's own checks
run, so a change inside the optimizer is not a change to the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLIT_POLICIES = ("waa-c", "waa-m")  # the policies whose workers are encoders and decoders


@dataclass(frozen=True)
class ScheduleSpec:
    policy: str = "continuous"
    encode_batch: int = 8
    decode_batch: int = 32
    decode_microbatches: int = 1
    decode_iters_per_encode: int = 1
    tp_degree: int = 1
    tp_stages: int = 0
    num_devices: int = 1
    encoder_devices: int = 0
    decoder_devices: int = 1
    worker_devices: int = 0
    mean_input_len: float = 0.0
    mean_decode_batch: float = 0.0
    encode_microbatches: int = 1
    encoder_tp_stages: int = -1
    chunk_tokens: int = 512

    @property
    def split(self) -> bool:
        """Whether its workers have separate encoder and decoder roles (WAA)."""
        return self.policy in SPLIT_POLICIES
