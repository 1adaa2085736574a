"""The execution schedule: what the scheduler publishes and what workers run.

Pure data, defined once: the optimizer returns one of these, the mesh's ``ScheduleUpdate`` message
carries it as it is (the codec encodes this dataclass; there is no second copy of its fields), and
workers build their policy objects from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Policy = Literal["rra", "waa-c", "waa-m", "static", "continuous", "mixed"]
POLICIES: tuple[Policy, ...] = ("rra", "waa-c", "waa-m", "static", "continuous", "mixed")
SPLIT_POLICIES: tuple[Policy, ...] = ("waa-c", "waa-m")


# The least value of each numeric field (the admin API's schema states them too).
MINIMUMS: dict[str, int] = {
    **dict.fromkeys(
        (
            "encode_batch",
            "decode_batch",
            "decode_microbatches",
            "decode_iters_per_encode",
            "tp_degree",
            "num_devices",
            "encode_microbatches",
            "chunk_tokens",
        ),
        1,
    ),
    **dict.fromkeys(
        ("tp_stages", "encoder_devices", "decoder_devices", "worker_devices", "mean_input_len", "mean_decode_batch"), 0
    ),
    "encoder_tp_stages": -1,
}


@dataclass(frozen=True)
class Schedule:
    """Control variables of an ExeGPT schedule: the paper's (ASPLOS 2024), plus the worker layout,
    the plan's expectations and the mixed policy's token budget.

    - ``encode_batch`` (B_E): new requests encoded together in one prefill batch (static
      batching: its fixed batch).
    - ``decode_batch`` (B_D): the most requests in the running decode batch of one worker.
    - ``decode_microbatches`` (B_m count): decode batch split into this many pipeline micro-batches.
    - ``decode_iters_per_encode`` (N_D): RRA's decode iterations between two encode phases
      (ignored by WAA, whose encoders run asynchronously).
    - ``tp_degree`` / ``tp_stages``: tensor parallelism of degree k applied to that many
      pipeline stages (partial TP); ``tp_degree == 1`` means none.
    - ``encoder_devices`` / ``decoder_devices``: WAA's split of devices between roles
      (RRA: every device does both, ``encoder_devices == 0``).
    - ``worker_devices``: devices one worker (a process, or a group of processes acting as one)
      runs on. 0: each role is one pipeline over all of its devices (the paper's layout). n > 0:
      the devices form workers of n devices each, data-parallel replicas under RRA, static and
      continuous, or ``encoder_devices / n`` encoders and ``decoder_devices / n`` decoders under
      WAA. Batch sizes are per worker.
    - ``mean_input_len`` / ``mean_decode_batch``: what the plan expects (the workload's mean
      prompt length; one worker's mean running decode batch). The run-time adjustment steers
      encode batches towards them (``optimizer.policies``); 0 turns that adjustment off.
    - ``encode_microbatches``: RRA's encode batch split into this many micro-batches that follow
      each other through the pipeline (continuous batching splits its prefills like its decode
      micro-batches; static and WAA encoders pass a batch whole).
    - ``encoder_tp_stages`` (WAA): -1, every stage of both groups has TP degree k (then
      ``tp_stages`` counts all of them); n >= 0, the encoder pipeline has n stages of degree k
      and the decoder pipeline ``tp_stages`` (partial TP inside each group), the rest single
      devices. Layers go to stages by their speed (derived from the profile, not carried).
    - ``chunk_tokens`` (mixed): the most tokens one step computes, one per decoded request plus
      the prompt chunks folded in (Sarathi's token budget); more than ``decode_batch``, so a full
      decode batch still leaves room for prefill. Ignored by the other policies.
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
    worker_devices: int = 0
    mean_input_len: float = 0.0
    mean_decode_batch: float = 0.0
    encode_microbatches: int = 1
    encoder_tp_stages: int = -1
    chunk_tokens: int = 512

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")
        for name, least in MINIMUMS.items():
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.policy == "mixed" and self.chunk_tokens <= self.decode_batch:
            raise ValueError(
                f"mixed needs chunk_tokens > decode_batch (room for prefill beside a full "
                f"decode batch), got {self.chunk_tokens} <= {self.decode_batch}"
            )
        if self.worker_devices:
            self._check_workers()

    def _check_workers(self) -> None:
        n = self.worker_devices
        groups = (self.encoder_devices, self.decoder_devices) if self.split else (self.num_devices,)
        if any(g % n for g in groups):
            raise ValueError(f"worker_devices {n} must divide the devices of each role {groups}")
        if self.split and not (self.encoder_devices and self.decoder_devices):
            raise ValueError(
                f"{self.policy} needs encoder and decoder devices, got {self.encoder_devices}/{self.decoder_devices}"
            )

    @property
    def split(self) -> bool:
        """Whether workers have separate encoder and decoder roles (WAA)."""
        return self.policy in SPLIT_POLICIES

    @property
    def encoder_workers(self) -> int:
        """Encoder workers (WAA); 0 for the other policies."""
        if not self.split:
            return 0
        return self.encoder_devices // self.worker_devices if self.worker_devices else 1

    @property
    def decoder_workers(self) -> int:
        """Decoder workers (WAA); 0 for the other policies."""
        if not self.split:
            return 0
        return self.decoder_devices // self.worker_devices if self.worker_devices else 1

    @property
    def workers(self) -> int:
        """Workers this schedule is planned for (every role)."""
        if self.split:
            return self.encoder_workers + self.decoder_workers
        return self.num_devices // self.worker_devices if self.worker_devices else 1


def describe(s: Schedule) -> str:
    """One line of ``s``'s parameters, as the commands and benchmarks print it."""
    parts = [s.policy, f"B_E={s.encode_batch}", f"B_D={s.decode_batch}", f"micro-batches={s.decode_microbatches}"]
    if s.policy == "rra":
        parts.append(f"N_D={s.decode_iters_per_encode}")
        if s.encode_microbatches > 1:
            parts.append(f"encode micro-batches={s.encode_microbatches}")
    if s.policy == "mixed":
        parts.append(f"tokens/step={s.chunk_tokens}")
    if s.policy.startswith("waa"):
        tp = f"TP={s.tp_degree}"
        if s.encoder_tp_stages >= 0 and s.tp_degree > 1:
            tp += f" on {s.encoder_tp_stages}/{s.tp_stages} stage(s)"
        parts.append(f"{tp} encoders/decoders={s.encoder_devices}/{s.decoder_devices}")
        if s.worker_devices:
            parts.append(f"workers of {s.worker_devices}")
    elif s.worker_devices:
        tp = f"TP={s.tp_degree}" + (f" on {s.tp_stages} stage(s)" if s.tp_degree > 1 else "")
        parts.append(f"{tp} x{s.workers} workers of {s.worker_devices}")
    elif s.tp_degree > 1:
        parts.append(f"TP={s.tp_degree} on {s.tp_stages} stage(s)")
    else:
        parts.append("TP=1")
    return "  ".join(parts)
