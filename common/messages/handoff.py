"""Encoders -> decoders, on the hand-off queue. The KV payload itself travels by the KV transport."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvReady:
    """One prefilled request, ready to join a decoder's running batch."""

    request_id: str
    producer: str  # encoder worker id
    reply_to: str  # the submitter's events queue
    kv_ref: str  # where the KV transport keeps the payload (a store key)
    prompt_len: int
    schedule_version: int  # version that produced the encode batch
    submitted_at: float
    stream: bool = True  # copied from EncodeWork


HandoffMessage = KvReady
