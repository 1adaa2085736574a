"""Encoders -> decoders, on the hand-off queue. The KV payload itself travels by the KV transport."""

from __future__ import annotations

from dataclasses import dataclass

from common.messages.work import EncodeWork


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
    resume: EncodeWork | None = None  # the request encoded again from here if its KV cache is gone


@dataclass(frozen=True)
class KvBlocks:
    """Where an encoder keeps one request's KV cache for a NIXL read (stored under ``kv_meta``).

    Only this descriptor is in the store; the bytes stay in the encoder's registered memory until
    the decoder's read releases them or ``expires_at`` (the lease) passes."""

    request_id: str
    producer: str  # encoder worker id
    agent: str  # the encoder's NIXL agent; its metadata is under ``kv_agent(agent)``
    address: int  # the block in the encoder's registered memory (DRAM)
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    layout: str
    expires_at: float  # unix seconds: the lease; the encoder frees the block then
    header: bytes  # the rest of the engine's hand-off (KvPayload.header)
    tokens: int  # positions the cache holds


HandoffMessage = KvReady
