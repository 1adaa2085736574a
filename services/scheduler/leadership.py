"""Which scheduler process is the active one: a lease in the store, a fencing token, the store's epoch.

One ``Leadership`` per scheduler process::

    standby ──acquire()──► leading ──hold() returns (a renewal failed, or lose())──► standby ─► ...
      (polls every ttl/4)     (renews every ttl/3; publishes under token, epoch, lease_until)

Taking the lease (``names.scheduler_lease``, holding ``owner``: this process's id and a nonce of
this run, so that two processes given one name never share it; TTL ``lease_ttl_s``)
starts a term: the term's fencing token is ``store.add(names.leader_token, 1)``, so every term
has a larger one than the terms before it in this store, and the store's epoch
(``names.store_epoch``) is read, or set if the store is fresh. A store that lost its data (Redis
restarted empty) has no epoch: the next leader sets a later one, so what it publishes orders
after everything the workers hold. A renewal also checks that the token counter and the epoch are
still this term's: if another process took a term meanwhile (the lease had lapsed), or the store
lost its data, the term is over.

``lease_until`` is conservative: the wall-clock time read just *before* the successful acquire or
renew call, plus the TTL. The store starts the TTL when it runs the call, later than that, so this
process never believes it holds the lease past the store's expiry.

Clock assumption: a scheduler stamps ``lease_until`` (its wall clock, unix seconds) on every update
it publishes, and workers compare it with their own wall clock. The wall clocks of the scheduler
and worker hosts must agree to well within the TTL (NTP keeps them to milliseconds; a skew near
``lease_ttl_s`` would let a worker accept a deposed leader's late update, or reject a valid one),
and the clocks must run at the same rate as the store's TTL clock over one TTL. A fresh epoch is
the new leader's wall clock in ms: later than the old one as long as the store was gone for longer
than the skew between the scheduler hosts (a leader that saw the old epoch takes a later one anyway).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from common.names import Names
from common.transport.port import Store


class Leadership:
    """One scheduler process's claim to be the active scheduler (see the module docstring)."""

    def __init__(
        self, store: Store, names: Names, process_id: str, ttl_s: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store, self.names, self.ttl_s = store, names, ttl_s
        self.owner = f"{process_id}/{uuid.uuid4().hex[:8]}"  # what the lease holds while this run leads
        self.clock = clock
        self.token = 0  # this term's fencing token; 0: no term yet
        self.epoch = 0  # the store's epoch (unix ms) this term runs in
        self.lease_until = 0.0  # unix seconds; the lease surely holds until then
        self.terms = 0  # terms this process has begun
        self._lost = asyncio.Event()
        self._lost.set()

    @property
    def leading(self) -> bool:
        """In a term that has not been found lost (the lease may still have lapsed: ``holds``)."""
        return not self._lost.is_set()

    def holds(self) -> bool:
        """Leading, and the lease surely holds now by this process's clock."""
        return self.leading and self.clock() < self.lease_until

    async def try_acquire(self) -> bool:
        """One attempt to take the lease; on success a new term begins. True if leading now."""
        if self.leading:
            return True
        before = self.clock()
        if not await self.store.acquire_lease(self.names.scheduler_lease, self.owner, ttl_s=self.ttl_s):
            return False
        self.token = await self.store.add(self.names.leader_token, 1)
        fresh = str(max(int(before * 1000), self.epoch + 1)).encode()  # later than any this process saw
        await self.store.set_if_absent(self.names.store_epoch, fresh)
        self.epoch = int(await self.store.get(self.names.store_epoch) or fresh)
        self.lease_until = before + self.ttl_s
        self.terms += 1
        self._lost.clear()
        return True

    async def acquire(self) -> None:
        """Stand by until the lease is ours (a hot standby: one attempt every ttl/4)."""
        while not await self.try_acquire():
            await asyncio.sleep(self.ttl_s / 4)  # polling the lease's expiry in the store

    async def renew(self) -> bool:
        """Extend the lease; False (and the term is over) if it lapsed and another term began,
        or the store lost its data, or someone else holds it."""
        if not self.leading:
            return False
        before = self.clock()
        renewed = await self.store.acquire_lease(self.names.scheduler_lease, self.owner, ttl_s=self.ttl_s)
        if renewed:
            token, epoch = await self.store.get_many(self.names.leader_token, self.names.store_epoch)
            renewed = (token, epoch) == (str(self.token).encode(), str(self.epoch).encode())
        if not renewed:
            await self.lose()
            return False
        self.lease_until = max(self.lease_until, before + self.ttl_s)
        return True

    async def secure(self) -> bool:
        """Before publishing: True if the lease surely holds now. Renews it first when less than
        half a TTL is left, so that an update stamped now reaches the workers before its
        ``lease_until``; a renewal that fails ends the term (False)."""
        if self.leading and self.clock() + self.ttl_s / 2 >= self.lease_until:
            await self.renew()
        return self.holds()

    async def hold(self) -> None:
        """Renew every ttl/3 while leading; return once the term is lost."""
        while self.leading:
            try:
                async with asyncio.timeout(self.ttl_s / 3):
                    await self._lost.wait()
            except TimeoutError:
                await self.renew()

    async def lose(self) -> None:
        """The term is over (found out here or by a fenced write that failed): stop leading and
        let go of the lease if this process still holds it, so that the next term starts at once."""
        if self.leading:
            self._lost.set()
            await self.release()

    async def release(self) -> None:
        """Give the lease up (on stopping, so a standby takes over without waiting for the TTL)."""
        self._lost.set()
        await self.store.release_lease(self.names.scheduler_lease, self.owner)
