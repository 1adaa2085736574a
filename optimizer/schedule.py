"""The execution schedule: what the scheduler publishes and what workers run.

Pure data. The optimizer returns one of these; the mesh wraps it with a version number when it
publishes it, and workers apply it between iterations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Policy = Literal["rra", "waa-c", "waa-m", "static", "continuous"]
POLICIES: tuple[Policy, ...] = ("rra", "waa-c", "waa-m", "static", "continuous")


@dataclass(frozen=True)
class Schedule:
    """Control variables of ExeGPT (DESIGN.md §1).

    - ``encode_batch`` (B_E): new requests encoded together in one prefill batch.
    - ``decode_batch`` (B_D): the most requests in the running decode batch of one worker.
    - ``decode_microbatches`` (B_m count): decode batch split into this many pipeline micro-batches.
    - ``decode_iters_per_encode`` (N_D): RRA's decode iterations between two encode phases
      (ignored by WAA, whose encoders run asynchronously).
    - ``tp_degree`` / ``tp_stages``: tensor parallelism of degree k applied to that many
      pipeline stages (partial TP); ``tp_degree == 1`` means none.
    - ``encoder_devices`` / ``decoder_devices``: WAA's split of devices between roles
      (RRA: every device does both, ``encoder_devices == 0``).
    """

    policy: Policy = "continuous"
    encode_batch: int = 8
    decode_batch: int = 32
    decode_microbatches: int = 1
    decode_iters_per_encode: int = 1
    tp_degree: int = 1
    tp_stages: int = 0
    num_devices: int = 1
    encoder_devices: int = 0
    decoder_devices: int = 1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")
        for name in ("encode_batch", "decode_batch", "decode_microbatches",
                     "decode_iters_per_encode", "tp_degree", "num_devices"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.tp_stages < 0 or self.encoder_devices < 0 or self.decoder_devices < 0:
            raise ValueError("tp_stages, encoder_devices and decoder_devices must be >= 0")
