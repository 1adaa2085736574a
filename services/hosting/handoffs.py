"""The engine's hand-offs as the KV data plane carries them: the cache's bytes apart, the rest of
the hand-off as a header that only the engine reads back."""

from __future__ import annotations

import dataclasses

from common.transport.kv import KvPayload
from engine.api import KVHandoff


def kv_payload(handoff: KVHandoff) -> KvPayload:
    """``handoff`` for the data plane; its KV bytes are not copied."""
    return KvPayload(
        handoff.request_id,
        dataclasses.replace(handoff, kv=b"").to_bytes(),
        handoff.kv,
        handoff.dtype,
        handoff.shape,
        handoff.layout,
        len(handoff.prompt_ids) + len(handoff.generated_ids),
    )


def engine_handoff(payload: KvPayload) -> KVHandoff:
    """The hand-off ``payload`` carries, its KV bytes not copied; ValueError when the header is
    not one this engine reads."""
    header = KVHandoff.from_bytes(payload.header)
    if header.request_id != payload.request_id:
        raise ValueError(f"the header is {header.request_id!r}'s, the payload {payload.request_id!r}'s")
    return dataclasses.replace(header, kv=payload.kv)
