"""The KV transport: where an encoder leaves a request's KV cache for a decoder.

What travels is a ``KvPayload``: the cache's bytes, what they are (dtype, shape, layout, tokens),
and the rest of the engine's hand-off as a header only the engine reads (the worker converts at
the boundary, ``services.hosting.handoffs``), so the data plane depends on no engine type.

Both adapters write the hand-off's metadata to the store (request id, producer, decoder, dtype,
shape, length, expiry) under ``names.kv_meta``. ``StoreKv`` puts the payload bytes in the store too
(Redis across hosts), together with the metadata in one round trip; ``LocalKv`` keeps the
payload object in process memory (embedded mode, no copy). The payload stays until the decoder
finished the request (``drop``), so a redelivered hand-off can be imported again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from common.names import Names
from common.transport.port import Store

PAYLOAD_VERSION = 1  # StoreKv's bytes: a msgpack map of KvPayload's fields under "v"


@dataclass(frozen=True)
class KvPayload:
    """One request's KV cache as the data plane carries it."""

    request_id: str
    header: bytes  # the rest of the engine's hand-off (its request, tokens, sampler state): opaque here
    kv: Any  # bytes, or a buffer the engine reads in place (an export's or a NIXL read's numpy array)
    dtype: str  # e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    layout: str  # how the engine lays the cache out, e.g. "llama:L,2,Hkv,T,D"
    tokens: int  # positions the cache holds

    @property
    def nbytes(self) -> int:
        return len(self.kv)  # a flat run of bytes, whatever holds it

    def to_bytes(self) -> bytes:
        """The payload as StoreKv keeps it: a versioned msgpack map, the KV bytes as a binary field."""
        data: bytes = msgpack.packb(
            {
                "v": PAYLOAD_VERSION,
                "request_id": self.request_id,
                "header": self.header,
                "dtype": self.dtype,
                "shape": list(self.shape),
                "layout": self.layout,
                "tokens": self.tokens,
                "kv": memoryview(self.kv),
            },
            use_bin_type=True,
        )
        return data

    @staticmethod
    def from_bytes(data: bytes) -> KvPayload:
        """A payload read back from ``to_bytes``; ValueError for anything else."""
        try:
            m = msgpack.unpackb(data, raw=False)
        except (msgpack.UnpackException, ValueError) as exc:
            raise ValueError(f"not a KV payload: {exc}") from exc
        if not isinstance(m, dict) or m.get("v") != PAYLOAD_VERSION:
            raise ValueError(f"unsupported KV payload version {m.get('v') if isinstance(m, dict) else None!r}")
        try:
            return KvPayload(
                m["request_id"], m["header"], m["kv"], m["dtype"], tuple(m["shape"]), m["layout"], int(m["tokens"])
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed KV payload: {exc!r}") from exc


class CorruptPayload(ValueError):
    """A hand-off's stored bytes are not a KV cache this version reads (corrupt, or another format)."""


class KvTransport(Protocol):
    async def put(self, payload: KvPayload, *, producer: str, ttl_s: float) -> str:
        """Keep the payload; return the reference a decoder passes to ``get``."""
        ...

    async def get(self, ref: str) -> KvPayload | None:
        """The payload, or None when it expired or was dropped."""
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


def _metadata(payload: KvPayload, producer: str, ttl_s: float) -> dict[str, str]:
    return {
        "request_id": payload.request_id,
        "producer": producer,
        "decoder": "",
        "dtype": payload.dtype,
        "shape": ",".join(str(d) for d in payload.shape),
        "length": str(payload.tokens),
        "nbytes": str(payload.nbytes),
        "expires_at": f"{time.time() + ttl_s:.3f}",
    }


class StoreKv:
    """Payload bytes in the store under ``names.kv_payload(request_id)``."""

    def __init__(self, store: Store, names: Names) -> None:
        self._store, self._names = store, names

    async def put(self, payload: KvPayload, *, producer: str, ttl_s: float) -> str:
        ref = self._names.kv_payload(payload.request_id)
        meta = self._names.kv_meta(payload.request_id)
        data = await asyncio.to_thread(payload.to_bytes)  # megabytes: never on the event loop
        await self._store.set_with_hash(ref, data, meta, _metadata(payload, producer, ttl_s), ttl_s=ttl_s)
        return ref

    async def get(self, ref: str) -> KvPayload | None:
        data = await self._store.get(ref)
        if data is None:
            return None
        try:
            return await asyncio.to_thread(KvPayload.from_bytes, data)
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
    """Same metadata, but the payload is the KvPayload object itself, shared in one process."""

    def __init__(self, store: Store, names: Names) -> None:
        super().__init__(store, names)
        self._objects: dict[str, KvPayload] = {}

    async def put(self, payload: KvPayload, *, producer: str, ttl_s: float) -> str:
        ref = self._names.kv_payload(payload.request_id)
        self._objects[ref] = payload
        await self._store.hset(
            self._names.kv_meta(payload.request_id), _metadata(payload, producer, ttl_s), ttl_s=ttl_s
        )
        return ref

    async def get(self, ref: str) -> KvPayload | None:
        return self._objects.get(ref)

    async def drop(self, ref: str) -> None:
        self._objects.pop(ref, None)
        await super().drop(ref)
