"""The worker: one kind of process whose role the schedule gives it.

Main loop, one iteration per step (the same ``Driver`` and policy objects the simulator runs)::

    receive (work or hand-offs → the driver) → schedule (a new version or role, at the boundary)
      → aborts → credits (WAA encoders) → plan = driver.plan() → execute (engine.step)
      → driver.complete → emit (tokens; hand-offs; finished requests settle)

Roles (``ScheduleUpdate.role_of``): under RRA, static and continuous a worker takes requests from
the encode queue and decodes them itself (the KV cache never leaves it); under WAA it is an
encoder (prefill, export, hand off) or a decoder (import, decode). A worker whose new role stops
it decoding keeps decoding for ``switch_drain_s``, then hands what still runs to decoders (WAA)
or re-queues it with the tokens already sent, so the text continues where it stopped.

This module holds the loop, its start and stop, the control messages and the heartbeat. The rest
is grouped by concern in classes ``Worker`` inherits, which share its state: the intake
(``intake``: deliveries decoded, admitted or refused), the role in the schedule (``roles``: a
version applied, a role entered or drained, WAA credits), the step (``stepping``: the plan run on
the engine, its events sent and its typed exits taken in one pass), how a request leaves
(``exits``: settled, refused, handed off, given back, released) and the trace spans (``spans``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import assert_never

from common.messages import codec
from common.messages.control import Abort, ControlMessage, ScheduleUpdate
from common.messages.status import WorkerStatus
from common.transport.errors import Backoff, is_outage, what_failed
from common.transport.port import (
    Subscription,
)
from optimizer.policies import (
    DrainPolicy,
    StepPlan,
)
from services.worker.exits import ABORTED_REMEMBERED, Exits
from services.worker.intake import Intake
from services.worker.metrics import WorkerState
from services.worker.roles import Roles
from services.worker.spans import StepSpans
from services.worker.stepping import Stepping

log = logging.getLogger(__name__)


class Worker(Intake, Roles, Stepping, Exits, StepSpans):
    """The loop over the parts; its state is ``WorkerBase``'s."""

    # ==== the loop ==============================================================================
    async def run(self) -> None:
        await self.start()
        backoff = Backoff()
        while self.should_continue():
            try:
                await self.iteration()
            except Exception as exc:  # an outage of the broker or the store: wait, then go on
                if not is_outage(exc):
                    raise
                delay = backoff.next_s()
                log.warning(
                    "worker %s: %s did not answer (%r); going on in %.1f s",
                    self.worker_id,
                    what_failed(exc),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)  # a retry's backoff, not a synchronisation
            else:
                backoff.reset()
        await self.close()

    async def iteration(self) -> None:
        """One batch boundary and (unless idle) one step."""
        await self.receive()
        await self.apply_schedule()
        await self.drop_aborted()
        await self.reserve_credits()
        plan = self.plan()
        if plan.idle:
            await self.wait_for_work()
            return
        result = await self.execute(plan)
        self.driver.complete(plan, self.outcome(result))
        await self.emit(plan, result)
        await self.fit_intake()

    def plan(self) -> StepPlan:
        plan = self.driver.plan()
        if self.trace is not None:  # requests received since the last boundary arrive at this one
            now = time.monotonic()
            for rid, input_len in self._arrived:
                self.trace.arrived(rid, input_len, now)
            self.trace.planned(plan, now)
        self._arrived.clear()
        return plan

    def should_continue(self) -> bool:
        """Run until stopped; then until the running batch is done or the drain time is up
        (what still runs then is redelivered to another worker when the connection closes)."""
        if not self.stopping.is_set():
            return True
        if self._stop_deadline is None:
            return True  # the next receive() begins the drain
        return bool(self.driver.running or self.driver.prefilling) and time.monotonic() < self._stop_deadline

    # ==== start and stop =========================================================================
    async def start(self) -> None:
        await self.bus.declare_fanout(self.names.control_exchange)
        await self.bus.declare_fanout(self.names.status_exchange)
        for queue in (self.names.encode_queue, self.names.handoff_queue):
            await self.bus.declare_queue(queue)
        control = await self.bus.subscribe(self.names.control_exchange, self.names.control_queue(self.worker_id))
        self._tasks.append(asyncio.create_task(self._pump_control(control)))
        await self.bus.declare_fanout(self.names.abort_exchange)
        aborts = await self.bus.subscribe(self.names.abort_exchange, self.names.abort_queue(self.worker_id))
        self._tasks.append(asyncio.create_task(self._pump_control(aborts, only=Abort)))
        stored = await self.store.get(self.names.schedule)
        if stored is not None:
            self.follower.offer(codec.decode(stored, ScheduleUpdate), stored=True)  # written under the lease
        self.follower.take()
        await self._enter(self.follower.role)
        self._tasks.append(asyncio.create_task(self._heartbeat()))
        await self.report("ready")
        self.ready.set()

    def stop(self) -> None:
        """Ask the loop to stop taking work and drain (safe from a signal handler)."""
        self.stopping.set()
        self.inbox.wake()

    async def _begin_stop(self) -> None:
        self._stop_deadline = time.monotonic() + self.config.drain_timeout_s
        await self._set_intake({})
        self.driver.switch(DrainPolicy(self.follower.schedule))
        await self.report("draining")

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        for held in self.held.values():  # still running at the drain's end: redelivered elsewhere
            self._end_decode_span(held, "abandoned")
        await self.report("stopping")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transports.close()

    # ==== receive ================================================================================
    async def _pump_control(self, subscription: Subscription, only: type | object = ControlMessage) -> None:
        """Control messages as they come (``only``: the kinds this exchange may carry; the abort
        exchange, which gateways publish to, carries no schedules)."""
        async for delivery in subscription:
            try:
                self.on_control(codec.decode(delivery.body, only))
            except (codec.DecodeError, ValueError):
                pass  # unreadable, invalid or out of place: ignored, nothing to redeliver
            except Exception:  # one bad message never stops the worker's control
                log.exception("worker %s: control message ignored", self.worker_id)
            await delivery.ack()

    def on_control(self, message: ControlMessage) -> None:
        match message:
            case ScheduleUpdate():
                if self.follower.offer(message):
                    self.inbox.wake()
            case Abort(request_id=request_id):
                self.aborted[request_id] = None
                while len(self.aborted) > ABORTED_REMEMBERED:
                    self.aborted.pop(next(iter(self.aborted)))
                if request_id in self.held:
                    self._abort_pending.append(request_id)
                    self.inbox.wake()
            case _:
                assert_never(message)

    def metrics_state(self) -> WorkerState:
        """The worker as a scrape sees it now."""
        engine = self.runner.engine
        decodes = self.role in ("worker", "decoder")
        return WorkerState(
            worker_id=self.worker_id,
            role=self.role,
            version=self.follower.version,
            running=len(self.driver.running),
            held=len(self.held),
            decode_slots=self.follower.schedule.decode_batch if decodes else 0,
            kv_tokens=sum(r.input_len + r.generated for r in self.driver.running.values()),
            kv_bytes_per_token=getattr(engine, "kv_bytes_per_token", None),
            kv_allocated_bytes=getattr(engine, "kv_allocated_bytes", None),
            ready=self.ready.is_set() and not self.stopping.is_set(),
        )

    async def report(self, state: str) -> bool:
        """Broadcast this worker's status; False when the broker could not take it (an outage:
        the next heartbeat tries again)."""
        running = len(self.driver.running)
        free = max(self.follower.schedule.decode_batch - running, 0) if self.role in ("worker", "decoder") else 0
        kv = self.metrics_state()
        status = WorkerStatus(
            self.worker_id,
            self.role,
            self.follower.version,
            running,
            free,
            state,
            time.time(),
            self.engine_s,
            self.steps,
            self.group,
            self.step_costs.drain(),
            kv.kv_tokens,
            float(kv.kv_tokens * (kv.kv_bytes_per_token or 0)),
            float(kv.kv_allocated_bytes or 0),
            (self.follower.schedule.encode_batch, self.follower.schedule.decode_batch),
        )
        try:
            await self.bus.broadcast(self.names.status_exchange, codec.encode(status))
        except Exception as exc:
            log.warning("worker %s: status report failed (%r); retrying at the next heartbeat", self.worker_id, exc)
            return False
        return True

    async def _heartbeat(self) -> None:
        """Report every heartbeat_s for as long as the worker runs, through broker outages: a
        worker whose reports stop is taken out of the schedule."""
        while True:
            await asyncio.sleep(self.config.heartbeat_s)  # a periodic report, not a synchronisation
            await self.report("alive")
            await self.records.flush()
