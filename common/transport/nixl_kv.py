"""The KV data plane over NIXL: the decoder reads the encoder's memory, Redis holds descriptors.

Each process that hands KV off runs one NIXL agent (UCX backend: shared memory or TCP between
processes on a host, RDMA between hosts where present). Its agent metadata lives in the store
under ``names.kv_agent(agent)``; the agent name is new in every process, so a restarted worker
publishes fresh metadata and nobody reads a dead process's.

    encoder                               store (Redis)                         decoder
    put: KV bytes -> staging block  ──►  kv_meta(rid): KvBlocks (descriptor)
         (registered, bounded pool)       kv_agent(enc): agent metadata
                                                                    ◄── get: read KvBlocks, add agent,
         ◄═════════════════ NIXL READ (block -> registered buffer) ═════════   delete kv_meta
    notification "released" ──► block freed; a block nobody reads is freed when its lease ends

Copies of the KV bytes, end to end on CPU: the engine's export straight into a staging block
(``export_buffer``), the NIXL read (staging block -> a block of the decoder's registered inbox),
the engine's import (inbox -> cache): three, against eight through Redis. Every NIXL call runs on
one thread of this adapter, never on the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from common.messages import codec
from common.messages.handoff import KvBlocks
from common.names import KV_AGENT_TTL_S, Names
from common.transport.kv import CorruptPayload, KvPayload
from common.transport.port import Store

ALIGN = 4096  # staging blocks start on page boundaries
READ_POLL_S = 0.0005  # the transfer thread's wait between checks of a running read
REAP_INTERVAL_S = 0.05  # how often an encoder with staged blocks looks for releases and expired leases
PROGRESS_POLL_US = 1000  # the agent's progress thread: woken by UCX events, else once per this


class NixlUnavailable(RuntimeError):
    """NIXL (the ``nixl-cu12`` package) cannot be loaded here."""


class StagingFull(RuntimeError):
    """The staging pool has no room for a hand-off within its wait."""


def load_nixl() -> Any:
    """The NIXL agent module, or NixlUnavailable with a one-line reason."""
    try:
        from nixl_cu12 import _api  # never the `nixl` meta package: it pulls a CUDA torch
    except Exception as exc:  # ImportError, or a shared library the wheel needs is missing
        raise NixlUnavailable(
            f"NIXL cannot load ({type(exc).__name__}: {exc}); install the 'nixl' extra "
            "(pip install nixl-cu12) or choose --kv-transport redis"
        ) from None
    return _api


_AGENT_LOCK = threading.Lock()


def open_agent(api: Any, name: str, poll_us: int = PROGRESS_POLL_US) -> Any:
    """A NIXL agent (UCX backend) whose progress thread sleeps in poll() between UCX events.

    NIXL's Python wrapper starts that thread with no delay: it busy-polls a whole core for as long
    as the agent lives, idle or not. The delay is a field of the binding's config that the wrapper
    sets to 0 just before it builds the agent, so the binding is wrapped for that one call. With
    1 ms an idle agent costs about 3 % of a core, and UCX events still wake the thread at once:
    hand-offs measured no slower (docs/mesh.md: 16 MiB in 6.6 ms against 11.5 ms before)."""
    bind = api.nixlBind

    class DelayedProgress:
        def __getattr__(self, attr: str) -> Any:
            return getattr(bind, attr)

        @staticmethod
        def nixlAgent(agent_name: str, config: Any) -> Any:  # noqa: N802 (the binding's name)
            config.pthrDelay = poll_us
            return bind.nixlAgent(agent_name, config)

    with _AGENT_LOCK:  # the wrapper reads the module global; agents are opened one at a time
        api.nixlBind = DelayedProgress()
        try:
            return api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
        finally:
            api.nixlBind = bind


def remote_disconnect_error() -> type[Exception]:
    """What NIXL raises for a transfer towards an agent whose connection is gone."""
    from nixl_cu12._bindings import nixlRemoteDisconnectError

    error: type[Exception] = nixlRemoteDisconnectError
    return error


class StagingPool:
    """First-fit allocation of aligned blocks in one buffer of ``capacity`` bytes (pure)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (offset, size), sorted by offset
        self._used: dict[int, int] = {}  # offset -> size

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    def allocate(self, nbytes: int) -> int | None:
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (offset, free) in enumerate(self._free):
            if free >= size:
                self._free[i : i + 1] = [(offset + size, free - size)] if free > size else []
                self._used[offset] = size
                return offset
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        i = bisect.bisect(self._free, (offset, size))
        self._free.insert(i, (offset, size))
        merged: list[tuple[int, int]] = []
        for o, s in self._free:  # coalesce neighbours
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            else:
                merged.append((o, s))
        self._free = merged


@dataclasses.dataclass
class _Staged:
    offset: int
    expires_at: float


class NixlKv:
    """The KvTransport port over NIXL; the agent starts on first use (``start`` to start it now)."""

    def __init__(
        self, store: Store, names: Names, *, pool_bytes: int, read_timeout_s: float, agent_name: str | None = None
    ) -> None:
        self._api = load_nixl()
        self._disconnected = remote_disconnect_error()
        self._store, self._names = store, names
        self.agent_name = agent_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pool = StagingPool(pool_bytes)
        self._pool_lock = threading.Lock()  # engines take blocks on their own thread (export_buffer)
        self._exports: dict[int, weakref.finalize[[int], np.ndarray]] = {}  # offset -> its block's return, until put
        self._inbox = StagingPool(pool_bytes)  # where reads land (its pages mapped once, then reused)
        self._inbox_lock = threading.Lock()  # blocks are freed by whichever thread drops the last view
        self._read_timeout_s = read_timeout_s
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="nixl")
        self._agent: Any = None
        self._buffer: np.ndarray | None = None
        self._inbox_buffer: np.ndarray | None = None
        self._published_at: float | None = None  # monotonic; None: never published
        self._remotes: set[str] = set()
        self._staged: dict[str, _Staged] = {}  # request id -> its block
        self._room = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None

    @property
    def staged_bytes(self) -> int:
        """Bytes of staging blocks in use: staged hand-offs, and exports not yet put."""
        with self._pool_lock:
            return self._pool.used_bytes

    @property
    def inbox_bytes(self) -> int:
        """Bytes of read KV caches still referenced (not yet imported and dropped)."""
        with self._inbox_lock:
            return self._inbox.used_bytes

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def start(self) -> None:
        if self._agent is None:
            await self._call(self._open_agent)
        await self._publish()

    def _open_agent(self) -> None:
        if self._agent is not None:
            return
        agent = open_agent(self._api, self.agent_name)
        buffer = np.empty(self._pool.capacity, dtype=np.uint8)
        inbox = np.empty(self._inbox.capacity, dtype=np.uint8)
        agent.register_memory([(b.ctypes.data, b.nbytes, 0, "") for b in (buffer, inbox)], "DRAM")
        self._agent, self._buffer, self._inbox_buffer = agent, buffer, inbox

    async def _publish(self) -> None:
        """The agent's metadata in the store, refreshed before half its TTL has passed."""
        if self._published_at is not None and time.monotonic() - self._published_at < KV_AGENT_TTL_S / 2:
            return
        metadata = await self._call(self._agent.get_agent_metadata)
        await self._store.set(self._names.kv_agent(self.agent_name), metadata, ttl_s=KV_AGENT_TTL_S)
        self._published_at = time.monotonic()

    # ---- encoder side ------------------------------------------------------------------------
    async def put(self, payload: KvPayload, *, producer: str, ttl_s: float) -> str:
        await self.start()
        nbytes = len(payload.kv)
        if nbytes > self._pool.capacity:
            raise StagingFull(
                f"{payload.request_id}: {nbytes} bytes of KV exceed the staging pool "
                f"({self._pool.capacity} bytes: kv_staging_mb)"
            )
        offset = self._claim_export(payload.kv)
        if offset is None:
            offset = await self._reserve(nbytes, deadline=time.monotonic() + ttl_s)
        try:
            await self._call(_stage, self._buffer, offset, payload)
            blocks = KvBlocks(
                payload.request_id,
                producer,
                self.agent_name,
                self._address(offset),
                nbytes,
                payload.dtype,
                payload.shape,
                payload.layout,
                time.time() + ttl_s,
                payload.header,
                payload.tokens,
            )
            ref = self._names.kv_meta(payload.request_id)
            await self._store.set(ref, codec.encode(blocks), ttl_s=ttl_s)
        except BaseException:
            self._free(offset)
            raise
        self._staged[payload.request_id] = _Staged(offset, time.time() + ttl_s)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_while_staged())
        return ref

    def _address(self, offset: int) -> int:
        assert self._buffer is not None
        return self._buffer.ctypes.data + offset

    def export_buffer(self, nbytes: int) -> np.ndarray | None:
        """A staging block for an engine to export a KV cache straight into (any thread): ``put``
        then stages it without a copy. Its block returns when the buffer is dropped unput. None
        before the agent started, or with no room (the engine gives bytes; ``put`` copies them)."""
        if self._buffer is None or nbytes <= 0:
            return None
        offset = self._allocate(nbytes)
        if offset is None:
            return None
        view = self._buffer[offset : offset + nbytes]
        self._exports[offset] = weakref.finalize(view, self._free, offset)
        return view

    def _claim_export(self, kv: Any) -> int | None:
        """The offset of the block ``kv`` was exported into, now the hand-off's; None for other memory."""
        if not isinstance(kv, np.ndarray) or self._buffer is None or kv.base is not self._buffer:
            return None
        offset = kv.ctypes.data - self._buffer.ctypes.data
        returned = self._exports.pop(offset, None)
        if returned is None or returned.detach() is None:
            return None  # not a live export of this pool: copy it as any other memory
        return offset

    def _allocate(self, nbytes: int) -> int | None:
        with self._pool_lock:
            return self._pool.allocate(nbytes)

    def _free(self, offset: int) -> None:
        with self._pool_lock:
            self._pool.free(offset)

    async def _reserve(self, nbytes: int, *, deadline: float) -> int:
        while (offset := self._allocate(nbytes)) is None:
            self._room.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise StagingFull(f"no room for {nbytes} bytes of KV in the staging pool")
            try:  # exports dropped unput free blocks from other threads, unannounced: look again soon
                await asyncio.wait_for(self._room.wait(), timeout=min(left, REAP_INTERVAL_S))
            except TimeoutError:
                pass
        return offset

    async def reap(self) -> int:
        """Free the blocks that decoders released or whose lease ran out; return how many."""
        released = await self._call(self._agent.get_new_notifs)
        names = {m.decode() for messages in released.values() for m in messages}
        now = time.time()
        done = [rid for rid, s in self._staged.items() if rid in names or s.expires_at <= now]
        for rid in done:
            self._free(self._staged.pop(rid).offset)
        if done:
            self._room.set()
        return len(done)

    async def _reap_while_staged(self) -> None:
        while self._staged:
            await self.reap()
            if self._staged:
                await asyncio.sleep(REAP_INTERVAL_S)  # a periodic sweep: NIXL notifications are polled

    # ---- decoder side ------------------------------------------------------------------------
    async def get(self, ref: str) -> KvPayload | None:
        data = await self._store.get(ref)
        if data is None:
            return None
        try:
            blocks = codec.decode(data, KvBlocks)
        except codec.DecodeError as exc:
            raise CorruptPayload(f"{ref}: {exc}") from exc
        if blocks.expires_at <= time.time():
            return None
        if blocks.agent == self.agent_name:  # staged here, before this worker's role changed
            kv = await self._take_own(blocks)
            if kv is None:  # its lease ended and the block was freed
                return None
        else:
            metadata = await self._store.get(self._names.kv_agent(blocks.agent))
            if metadata is None:  # the encoder's process is gone, and its memory with it
                return None
            await self.start()
            kv = await self._call(self._read, blocks, metadata)
            if kv is None:
                return None
        await self._store.delete(ref)
        return KvPayload(blocks.request_id, blocks.header, kv, blocks.dtype, blocks.shape, blocks.layout, blocks.tokens)

    def _read(self, blocks: KvBlocks, metadata: bytes) -> np.ndarray | None:
        """READ the blocks into a registered buffer; the notification releases them on the encoder.
        None when the encoder's process is gone: nothing answers at its agent's address, or the
        connection kept from an earlier read was to a process that has since died."""
        try:
            return self._read_from(blocks, metadata)
        except self._disconnected:  # connect anew: a live encoder answers, a dead one refuses
            self._forget(blocks.agent)
            return self._read_from(blocks, metadata)

    def _read_from(self, blocks: KvBlocks, metadata: bytes) -> np.ndarray | None:
        if not self._connect(blocks.agent, metadata):
            return None
        try:
            return self._transfer(blocks)
        except (TimeoutError, ConnectionError):  # the next try connects anew
            self._forget(blocks.agent)
            raise

    def _connect(self, name: str, metadata: bytes) -> bool:
        if name not in self._remotes:
            try:
                self._agent.add_remote_agent(metadata)
            except Exception:  # NIXL's errors (NIXL_ERR_BACKEND): the agent's address refuses
                return False
            self._remotes.add(name)
        return True

    def _forget(self, name: str) -> None:
        if name in self._remotes:
            self._remotes.discard(name)
            try:
                self._agent.remove_remote_agent(name)
            except Exception:  # NIXL's errors: already unusable, nothing more to drop
                pass

    def _transfer(self, blocks: KvBlocks) -> np.ndarray:
        agent = self._agent
        kv, registered = self._landing(blocks.nbytes)
        try:
            handle = agent.initialize_xfer(
                "READ",
                agent.get_xfer_descs([(kv.ctypes.data, blocks.nbytes, 0)], "DRAM"),
                agent.get_xfer_descs([(blocks.address, blocks.nbytes, 0)], "DRAM"),
                blocks.agent,
                blocks.request_id.encode(),
            )
            try:
                state = agent.transfer(handle)
                deadline = time.monotonic() + self._read_timeout_s
                while state == "PROC":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"NIXL read of {blocks.request_id} from {blocks.agent} timed out")
                    time.sleep(READ_POLL_S)
                    state = agent.check_xfer_state(handle)
                if state != "DONE":
                    raise ConnectionError(f"NIXL read of {blocks.request_id} from {blocks.agent}: {state}")
            finally:
                agent.release_xfer_handle(handle)
        finally:
            if registered is not None:
                agent.deregister_memory(registered)
        return kv

    async def _take_own(self, blocks: KvBlocks) -> np.ndarray | None:
        """A block this process staged, copied out of its staging pool and freed: NIXL has no
        transfer from an agent to itself (NIXL_ERR_INVALID_PARAM), and needs none."""
        staged = self._staged.get(blocks.request_id)
        if staged is None or self._address(staged.offset) != blocks.address:
            return None
        del self._staged[blocks.request_id]  # ours now: neither a lease nor a release frees it under the copy
        try:
            copy: np.ndarray = await self._call(_copy_block, self._buffer, staged.offset, blocks.nbytes)
            return copy
        finally:
            self._free(staged.offset)
            self._room.set()

    def _landing(self, nbytes: int) -> tuple[np.ndarray, Any]:
        """Where a read lands: a block of the registered inbox, freed when the last view of it
        goes (the engine imported it); when the inbox is full, memory registered for this read."""
        with self._inbox_lock:
            offset = self._inbox.allocate(nbytes)
        if offset is None:
            kv = np.empty(nbytes, dtype=np.uint8)  # not zeroed: the read fills it
            return kv, self._agent.register_memory([(kv.ctypes.data, nbytes, 0, "")], "DRAM")
        assert self._inbox_buffer is not None
        kv = self._inbox_buffer[offset : offset + nbytes]
        weakref.finalize(kv, self._free_landed, offset)
        return kv, None

    def _free_landed(self, offset: int) -> None:
        with self._inbox_lock:
            self._inbox.free(offset)

    async def claim(self, ref: str, *, decoder: str) -> None:
        """Nothing to record: the descriptor is deleted once its blocks are read."""

    async def drop(self, ref: str) -> None:
        await self._store.delete(ref)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._agent is not None:
            await self._store.delete(self._names.kv_agent(self.agent_name))
        self._staged.clear()
        self._thread.shutdown(wait=True)
        self._agent = None  # its threads stop with it; the buffers it registered outlive it


def _stage(buffer: np.ndarray, offset: int, payload: KvPayload) -> None:
    """Copy the KV bytes into their block (unless exported there)."""
    block = buffer[offset : offset + len(payload.kv)]
    if not (isinstance(payload.kv, np.ndarray) and payload.kv.ctypes.data == block.ctypes.data):
        block[:] = np.frombuffer(payload.kv, dtype=np.uint8)


def _copy_block(buffer: np.ndarray, offset: int, nbytes: int) -> np.ndarray:
    return buffer[offset : offset + nbytes].copy()
