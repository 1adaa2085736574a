"""The KV transport: where an encoder leaves a request's KV cache for a decoder.

Both adapters write the hand-off's metadata to the store (request id, producer, decoder, dtype,
shape, length, expiry) under ``names.kv_meta``. ``StoreKv`` puts the payload bytes in the store too
(Redis across hosts), together with the metadata in one round trip; ``LocalKv`` keeps the
KVHandoff object in process memory (embedded mode, no copy). The payload stays until the decoder
finished the request (``drop``), so a redelivered hand-off can be imported again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from common.names import Names
from common.transport.port import Store
from engine.api import KVHandoff


class CorruptPayload(ValueError):
    """A hand-off's stored bytes are not a KV cache this version reads (corrupt, or another format)."""


class KvTransport(Protocol):
    async def put(self, handoff: KVHandoff, *, producer: str, ttl_s: float) -> str:
        """Keep the hand-off; return the reference a decoder passes to ``get``."""
        ...

    async def get(self, ref: str) -> KVHandoff | None:
        """The hand-off, or None when it expired or was dropped."""
        ...

    async def claim(self, ref: str, *, decoder: str) -> None:
        """Record which decoder runs the request."""
        ...

    def export_buffer(self, nbytes: int) -> Any | None:
        """Memory of this transport's own that an engine may export a KV cache into (any thread),
        so that ``put`` need not copy it again; None: the engine gives bytes."""
        ...

    async def drop(self, ref: str) -> None: ...

    async def close(self) -> None:
        """Stop serving hand-offs this process still holds (their readers find them gone)."""
        ...


def _metadata(handoff: KVHandoff, producer: str, ttl_s: float) -> dict[str, str]:
    return {
        "request_id": handoff.request_id,
        "producer": producer,
        "decoder": "",
        "dtype": handoff.dtype,
        "shape": ",".join(str(d) for d in handoff.shape),
        "length": str(len(handoff.prompt_ids) + len(handoff.generated_ids)),
        "nbytes": str(len(handoff.kv)),
        "expires_at": f"{time.time() + ttl_s:.3f}",
    }


class StoreKv:
    """Payload bytes in the store under ``names.kv_payload(request_id)``."""

    def __init__(self, store: Store, names: Names) -> None:
        self._store, self._names = store, names

    async def put(self, handoff: KVHandoff, *, producer: str, ttl_s: float) -> str:
        ref = self._names.kv_payload(handoff.request_id)
        meta = self._names.kv_meta(handoff.request_id)
        data = await asyncio.to_thread(handoff.to_bytes)  # megabytes: never on the event loop
        await self._store.set_with_hash(ref, data, meta, _metadata(handoff, producer, ttl_s), ttl_s=ttl_s)
        return ref

    async def get(self, ref: str) -> KVHandoff | None:
        data = await self._store.get(ref)
        if data is None:
            return None
        try:
            return await asyncio.to_thread(KVHandoff.from_bytes, data)
        except Exception as exc:
            raise CorruptPayload(f"{ref}: {type(exc).__name__}: {exc}") from exc

    async def claim(self, ref: str, *, decoder: str) -> None:
        await self._store.hset(self._meta_key(ref), {"decoder": decoder})

    async def drop(self, ref: str) -> None:
        await self._store.delete(ref, self._meta_key(ref))

    async def close(self) -> None:
        """Payloads live in the store, not in this process: nothing to stop."""

    def export_buffer(self, nbytes: int) -> None:
        """The payload is serialised whatever it is exported into."""
        return None

    def _meta_key(self, ref: str) -> str:
        return self._names.kv_meta(ref.rsplit(":", 1)[-1])


class LocalKv(StoreKv):
    """Same metadata, but the payload is the KVHandoff object itself, shared in one process."""

    def __init__(self, store: Store, names: Names) -> None:
        super().__init__(store, names)
        self._objects: dict[str, KVHandoff] = {}

    async def put(self, handoff: KVHandoff, *, producer: str, ttl_s: float) -> str:
        ref = self._names.kv_payload(handoff.request_id)
        self._objects[ref] = handoff
        await self._store.hset(
            self._names.kv_meta(handoff.request_id), _metadata(handoff, producer, ttl_s), ttl_s=ttl_s
        )
        return ref

    async def get(self, ref: str) -> KVHandoff | None:
        return self._objects.get(ref)

    async def drop(self, ref: str) -> None:
        self._objects.pop(ref, None)
        await super().drop(ref)
