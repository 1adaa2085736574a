"""A worker's role in the schedule in force: a new version applied at the boundary, the role
entered (its queues, its credits) or reached through a drain, and the requests it gives back
when it leaves a role."""

from __future__ import annotations

import asyncio
import logging
import time

from common.messages import codec
from common.names import Names
from optimizer.policies import (
    DrainPolicy,
    IdlePolicy,
    Role,
    StepPlan,
    make_policy,
)
from optimizer.schedule import Schedule
from services.worker.base import Drain, WorkerBase
from services.worker.mailbox import Outbox
from services.worker.requests import Held

# the worker's lines keep one logger name, whichever of its modules writes them
log = logging.getLogger("services.worker.worker")


def intake_for(role: Role, schedule: Schedule, names: Names) -> dict[str, int]:
    """The queues a worker of ``role`` consumes, each with the unacked messages it may hold. A
    "worker" holds at most B_D requests, running and waiting together, so it takes only what it
    can start at its next boundary (a busy worker holding requests another could start, a static
    batch mid-way above all, would idle that one); it also takes hand-offs left over from a WAA
    schedule (or from a decoder that died) into free slots, so none is stranded. An encoder holds
    two encode batches (the run-time adjustment picks from them)."""
    if role == "worker":  # no more than its batch holds: what waits here could start on a worker with room
        return {names.encode_queue: schedule.decode_batch, names.handoff_queue: schedule.encode_batch}
    if role == "encoder":
        return {names.encode_queue: 2 * schedule.encode_batch}
    if role == "decoder":
        return {names.handoff_queue: schedule.decode_batch}
    return {}


class Roles(WorkerBase):
    """Methods of ``services.worker.worker.Worker``: they use its state."""

    async def apply_schedule(self) -> None:
        """At the boundary: a newer version takes effect; a drain in progress may end."""
        if not self.stopping.is_set() and self.follower.take() is not None:
            cut = self.follower.capped()
            if cut:  # said once per version: the recorded schedule is not quite the one that runs
                log.warning(
                    "worker %s: schedule v%d runs with %s (max_encode_batch / max_decode_batch)",
                    self.worker_id,
                    self.follower.version,
                    cut,
                )
            await self._enter(self.follower.role)
            await self.report("applied")
            self.changed.set()
        busy = self.driver.running or self.driver.prefilling
        if self._drain is not None and (not busy or time.monotonic() >= self._drain.deadline):
            role, self._drain = self._drain.role, None
            await self._give_back_running()
            await self._become(role)

    async def _enter(self, role: Role) -> None:
        """Take ``role`` under the schedule in force; drain first if it stops us decoding what runs."""
        self._drain = None
        if (self.driver.running or self.driver.prefilling) and role not in ("worker", "decoder"):
            self._drain = Drain(role, time.monotonic() + self.config.switch_drain_s)
            await self._set_intake({})
            self.driver.switch(DrainPolicy(self.follower.schedule))
            return
        await self._become(role)

    async def _become(self, role: Role) -> None:
        schedule = self.follower.schedule
        await self._set_intake(intake_for(role, schedule, self.names))
        unchanged = (
            role == self.role
            and schedule == self.driver.policy.schedule
            and not isinstance(self.driver.policy, (DrainPolicy, IdlePolicy))
        )
        self.role = role
        if not unchanged:  # a version that only moved other workers keeps this policy's counters
            self.driver.switch(make_policy(schedule, role))
        self.changed.set()
        if role == "decoder":  # this version's count starts from what it can take now
            free = schedule.decode_batch - len(self.driver.running) - len(self.driver.incoming)
            await self.credits.grant(self.follower.version, max(free, 0))

    async def _set_intake(self, queues: dict[str, int]) -> None:
        """Consume ``queues`` (queue -> prefetch); work taken from a queue no longer consumed and
        not started goes back."""
        dropped = [q for q in self._intake if q not in queues]
        for queue in dropped:
            await self._intake.pop(queue).cancel()
        if dropped:
            await self._give_back_waiting(set(dropped))
        self._encode_prefetch = queues.get(self.names.encode_queue, 0)
        for queue, prefetch in queues.items():
            if queue in self._intake:
                await self._intake[queue].set_prefetch(prefetch)
            else:
                self._intake[queue] = await self.bus.consume(queue, prefetch=prefetch, on_dead=self._on_dead)
                self._tasks.append(asyncio.create_task(self._pump(queue, self._intake[queue])))

    async def _give_back_waiting(self, queues: set[str]) -> None:
        """Requeue what came from ``queues`` and has not started: received deliveries, queued
        work, unmerged hand-offs."""
        for queue, delivery in self.inbox.take():
            if queue in queues:
                await delivery.release()
            else:
                self.inbox.put((queue, delivery))
        waiting = []
        if self.names.encode_queue in queues:
            waiting += list(self.driver.queued)
        if self.names.handoff_queue in queues:
            waiting += list(self.driver.incoming)
        for rid in waiting:
            self.driver.remove(rid)
            await self.held.pop(rid).delivery.release()  # not started: no attempt used

    async def _give_back_running(self) -> None:
        """Requests still running when a drain ends: to the decoders if the schedule has them and
        they have room (the KV cache moves), else back to the encode queue with the tokens sent
        (as is a prompt still being prefilled in chunks)."""
        running = list(self.driver.running)
        if not (running or self.driver.prefilling):
            return
        room = 0
        if self.follower.schedule.split and running:
            room = await self.credits.take(self.follower.version, len(running))
        running += list(self.driver.prefilling)
        outbox = Outbox()
        for rid in running:
            for token in self.held[rid].flush():
                outbox.token(self.held[rid].reply_to, token)
        published = self.send_soon(outbox)
        moves = []
        for i, rid in enumerate(running):
            held = self.held.pop(rid)
            self.driver.remove(rid)
            if i < room:
                handoff = await self.runner.call(self.runner.engine.export_request, rid, self.kv.export_buffer)
                moves.append(self._hand_off(held, handoff, published))
                self.moved["handed_off"] += 1
            else:
                await self.runner.call(self.runner.engine.abort, rid)
                moves.append(self._requeue(held, published))
                self.moved["requeued"] += 1
        await asyncio.gather(*moves)

    async def _requeue(self, held: Held, published: list[asyncio.Task[None]]) -> None:
        """Back to the encode queue with the tokens already delivered; a KV cache it came with
        is dropped (the next worker prefills prompt + tokens)."""
        self._end_decode_span(held, "requeued")
        await asyncio.gather(*held.sent, *published)
        await self.bus.publish(
            self.names.encode_queue,
            codec.encode(held.continuation(self.config.model)),
            headers=self.tracing.inject(held.trace),
            deadline=held.deadline,
        )
        if held.ready is not None:
            await self.kv.drop(held.ready.kv_ref)
        await held.delivery.ack()

    # ==== aborts and credits =====================================================================
    async def reserve_credits(self) -> None:
        """An encoder holds, for this step, the decode slots its encode batch may fill."""
        if self.role != "encoder":
            self.driver.downstream_free = None
            return
        want = 2 * self.follower.schedule.encode_batch if self.driver.queued else 0
        self.driver.downstream_free = await self.credits.take(self.follower.version, want)

    async def _return_credits(self, plan: StepPlan) -> None:
        unused = (self.driver.downstream_free or 0) - len(plan.encode)
        if self.role == "encoder" and unused > 0:
            await self.credits.grant(self.follower.version, unused)
        self.driver.downstream_free = None
