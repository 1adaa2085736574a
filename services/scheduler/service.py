"""The scheduler service: owns the versioned schedule and gives every live worker its role.

Main loop: receive (heartbeats from the status exchange; pin, bound and re-plan requests from its
queue) → note who is alive (a worker silent for ``heartbeat_timeout_s`` is gone) → learn from the
finish records and search again when there is a reason (``services.scheduler.brain``) → allocate roles
(``services.scheduler.allocation``) → publish a new version when the schedule or the roles change.

The current ScheduleUpdate lives in the store (``names.schedule``) for workers that join late and
goes out on the control fanout exchange. Only the scheduler that holds the lease
(``services.scheduler.leadership``) publishes, each version fenced by it; others stand by, hearing every
heartbeat, and take over when it lapses. What the leader decided and on what is kept in the
store (``names.scheduler_state``) for the admin API and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from common.config import MeshConfig
from common.messages import codec
from common.messages.control import PinSchedule, Replan, SchedulerRequest, ScheduleUpdate, SetBound, SetSlo
from common.messages.schedule import ScheduleSpec
from common.messages.status import SchedulerState, StatusMessage, WorkerStatus
from common.names import OUTPUT_LENGTHS_MAX, Names, new_worker_id
from common.scheduling import current_schedule, recent_lengths
from common.transport.connect import Transports
from common.transport.errors import Backoff, is_outage, what_failed
from common.transport.port import Subscription, processing
from optimizer.schedule import Schedule
from optimizer.slo import Slo
from optimizer.traffic import LONG_S
from services.scheduler.allocation import Allocation, allocate
from services.scheduler.brain import Brain, Decision
from services.scheduler.leadership import Leadership
from services.scheduler.planning import Planner, PlanningError
from services.schedules import DEFAULT, parse_schedule, planned, wire_schedule

log = logging.getLogger("exegpt.scheduler")

LEARN_EVERY_S = 0.5  # how often the finish records are read and the drift test runs
SEARCHES_KEPT = 8  # the latest searches' spans, to tell the steps measured during one
CALIBRATION_EVERY = 10  # looks between two saves of the calibration to the store (5 s)
READ_FIRST = 256  # finish records read per look (more while all of them are new)


def lower_priority(nice: int) -> None:
    """Raise the calling thread's niceness by ``nice`` (Linux, where a thread has a priority of its
    own; elsewhere the call would lower the whole process's, so nothing is done)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
    except OSError as exc:  # a container may refuse it: searches then run at the scheduler's priority
        log.warning("scheduler: cannot lower the search thread's priority: %s", exc)


class SchedulerService:
    def __init__(self, config: MeshConfig, transports: Transports) -> None:
        self.config = config
        self.names = Names(config.namespace)
        self.transports = transports
        self.bus, self.store = transports.bus, transports.store
        self.worker_id = new_worker_id(config, "scheduler")
        self.target = parse_schedule(config.schedule) if config.schedule else DEFAULT
        self.pin_set = config.schedule is not None  # an operator's pin: plans do not replace it
        self.brain = Brain(config, Planner(config) if config.profile else None)
        self.planning: asyncio.Task | None = None
        self.searches: deque[list[float]] = deque(maxlen=SEARCHES_KEPT)  # [start, end] unix s; end inf while running
        # searches run on a thread of their own, at a lower priority than the event loop and than
        # the workers on a shared host (``search_nice``)
        self.searching = ThreadPoolExecutor(1, "search", initializer=lower_priority, initargs=(config.search_nice,))
        self.decided = asyncio.Event()  # set after each search (tests wait on it)
        self.learned = asyncio.Event()  # set after each look at the finish records (tests wait on it)
        self.looks = 0  # looks at the finish records so far
        self.last_decision: Decision | None = None
        self._retry_at = 0.0  # after a failed search, not before this (time.monotonic)
        self.workers: dict[str, WorkerStatus] = {}
        self.heard: dict[str, float] = {}  # worker id -> time.monotonic of its last report
        self.current: ScheduleUpdate | None = None
        self.allocation: Allocation | None = None
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.published = asyncio.Event()  # set at each publish (tests wait on it)
        self._changed = asyncio.Event()
        self.leadership = Leadership(self.store, self.names, self.worker_id, config.lease_ttl_s)
        self.announce: Callable[[str], None] = log.info  # "leading ..." / "standby ..." lines
        self.refused = 0  # publishes whose fenced store write was refused: the lease had been lost

    async def start(self) -> Subscription:
        """Listen to the workers, and lead at once if no other scheduler holds the lease (a single
        scheduler always does: ``ready`` then means leading); stand by otherwise. ``ready``:
        started, leading or standing by."""
        await self.bus.declare_fanout(self.names.control_exchange)
        await self.bus.declare_fanout(self.names.status_exchange)
        await self.bus.declare_queue(self.names.scheduler_queue)
        status = await self.bus.subscribe(self.names.status_exchange, self.names.status_queue(self.worker_id))
        if await self.leadership.try_acquire():
            await self._take_office()
        else:
            self.announce(f"standby scheduler {self.worker_id}")
        self.ready.set()
        return status

    async def run(self) -> None:
        status = await self.start()
        tasks = [
            asyncio.create_task(self._receive_reports(status)),
            asyncio.create_task(self._serve_terms()),
            asyncio.create_task(self.stopping.wait()),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                log.error("scheduler: stopped by %r", outcome)
        self.searching.shutdown(wait=False, cancel_futures=True)  # a search under way is not waited for
        try:
            await self.leadership.release()  # a standby takes over now, not a TTL later
        finally:
            await self.transports.close()

    def stop(self) -> None:
        self.stopping.set()

    # --- lead or stand by ---------------------------------------------------------------------
    async def _serve_terms(self) -> None:
        """Lead while this process holds the lease; stand by while another does (a hot standby:
        it hears every heartbeat), and take over once the lease lapses."""
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                if not self.leadership.leading:
                    await self.leadership.acquire()
                    await self._take_office()
                if self.leadership.leading:
                    await self._lead()
                    self.announce(f"standby scheduler {self.worker_id} (lease lost)")
                backoff.reset()
            except Exception as exc:  # an outage of the store or the broker ends the term, not the service
                if not is_outage(exc):
                    raise
                delay = backoff.next_s()
                log.warning(
                    "scheduler %s: %s did not answer (%r); trying again in %.1f s (workers keep the schedule they run)",
                    self.worker_id,
                    what_failed(exc),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)  # a retry's backoff, not a synchronisation

    async def _take_office(self) -> None:
        """A term begins: carry on from the stored schedule and pin, and publish a version under
        this term's token even if nothing changed, so workers fence out the previous leader."""
        self.announce(f"leading scheduler {self.worker_id} token {self.leadership.token}")
        self.current = await current_schedule(self.store, self.names)
        calibration = await self.store.get(self.names.calibration)
        if calibration is not None and self.brain.calibrator is not None and not self.brain.calibrator.model.observed:
            self.brain.calibrator.loads(calibration)  # a new leader starts calibrated
        stored = await self.store.get(self.names.pinned_schedule)
        if stored is not None and not self.config.schedule:  # a restarted scheduler keeps the pin
            kept = _planned_or_none(codec.decode(stored, PinSchedule).schedule)
            self.target, self.pin_set = kept or DEFAULT, kept is not None
        if self.current is not None and not self.pin_set:  # keep running what runs until a plan says otherwise
            self.target = _planned_or_none(self.current.schedule) or DEFAULT
        self.expire()
        if await self.reconcile() is None and self.current is not None:
            previous = {a.worker_id: a.role for a in self.current.allocation}
            await self._publish(allocate(self.target, list(self.heard), previous))

    async def _lead(self) -> None:
        """One term as the active scheduler: take requests, keep the allocation, learn, renew the
        lease; until the lease is lost (or a duty fails)."""
        requests = await self.bus.consume(self.names.scheduler_queue, prefetch=16)
        receiving = asyncio.create_task(self._receive_requests(requests))
        duties = [asyncio.create_task(self._keep_allocated()), asyncio.create_task(self._learn())]
        holding = asyncio.create_task(self.leadership.hold())
        try:
            await asyncio.wait([holding, receiving, *duties], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for ending in (self.leadership.lose(), requests.cancel()):  # the request in hand is finished
                try:  # (publishing nothing); the rest go back
                    await ending
                except Exception as exc:  # the store or broker is out: the lease lapses, the broker returns them
                    if not is_outage(exc):
                        raise
                    log.info("scheduler %s: ending the term: %r", self.worker_id, exc)
            for task in (holding, *duties, self.planning):
                if task is not None:
                    task.cancel()
            await asyncio.wait([receiving], timeout=self.config.lease_ttl_s)
            receiving.cancel()
            outcomes = await asyncio.gather(holding, receiving, *duties, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, Exception)]
        if failed:
            raise failed[0]  # a duty that fails stops the service, as it did before terms

    # --- receive ------------------------------------------------------------------------------
    async def _receive_reports(self, subscription: Subscription) -> None:
        """Heartbeats; one that does not decode, or that fails to record, is dropped (the next
        one from that worker comes a heartbeat later)."""
        async for delivery in subscription:
            try:
                self.record(codec.decode(delivery.body, StatusMessage))
            except codec.DecodeError:
                pass
            except Exception:
                log.exception("scheduler: a status report was dropped")
            await delivery.ack()

    async def _receive_requests(self, subscription: Subscription) -> None:
        """Requests, each under the per-message guard: undecodable ones go to the dead queue at
        once; one whose handling raises goes back (a counted attempt) and, at the delivery limit,
        to the dead queue with the reason; the loop goes on with the next."""
        async for delivery in subscription:
            try:
                request = codec.decode(delivery.body, SchedulerRequest)
            except Exception as exc:
                await delivery.dead_letter(f"undecodable: {exc}")
                continue
            if isinstance(request, PinSchedule) and request.schedule is not None:
                try:
                    planned(request.schedule)
                except ValueError as exc:  # what the planner refuses is refused once, not retried
                    await delivery.dead_letter(f"invalid schedule: {exc}")
                    continue
            async with processing(delivery, swallow=True):
                await self.handle(request)

    async def handle(self, request: SchedulerRequest) -> None:
        match request:
            case PinSchedule(schedule=schedule):
                await self.pin(None if schedule is None else planned(schedule))
            case SetBound(latency_bound_s=bound):
                self.brain.set_bound(bound)
                self._changed.set()
            case Replan(reason=reason):
                self.brain.ask(f"asked: {reason}" if reason else "asked")
                self._changed.set()
            case SetSlo(ttft_s=ttft, ttft_percentile=ttft_p, tpot_s=tpot, tpot_percentile=tpot_p):
                self.brain.set_slo(Slo(ttft_s=ttft, ttft_percentile=ttft_p, tpot_s=tpot, tpot_percentile=tpot_p))
                self._changed.set()

    def record(self, status: WorkerStatus) -> None:
        """A heartbeat: the worker is alive (or, ``stopping``, gone)."""
        known = status.worker_id in self.heard
        if status.state == "stopping":
            self.workers.pop(status.worker_id, None)
            self.heard.pop(status.worker_id, None)
            self._changed.set()
            return
        self.workers[status.worker_id] = status
        self.heard[status.worker_id] = time.monotonic()
        if self.brain.calibrator is not None and status.step_costs:
            # a step measured while a search ran is not the machine's speed where the scheduler
            # shares the workers' cores: fitted, it made the slowdown a search causes a reason to search
            costs = [c for c in status.step_costs if not self.during_search(c.at - c.seconds, c.at)]
            self.brain.calibrator.observe(costs)
        if not known:
            self._changed.set()
            self._note_groups()

    def during_search(self, start: float, end: float) -> bool:
        """Whether [start, end] (unix seconds) overlaps one of the latest searches."""
        return any(start < to and end > since for since, to in self.searches)

    def _note_groups(self) -> None:
        """Plan for the shape of the workers' process groups (the most common one if they differ)."""
        planner = self.brain.planner
        if planner is None or not self.workers:
            return
        shapes = Counter(tuple(s.group) for s in self.workers.values())
        shape = shapes.most_common(1)[0][0]
        planner.group = None if shape == (1,) else shape

    # --- learn and plan -----------------------------------------------------------------------
    async def _learn(self) -> None:
        """Read new finish records, test for drift, search when there is a reason, report."""
        while not self.stopping.is_set():
            try:
                await self.learn_once()
            except Exception as exc:  # a store hiccup must not stop the scheduler
                if not is_outage(exc):
                    log.exception("scheduler: learning step failed")
                else:  # expected while the store or the broker is away: one line, not a traceback
                    log.warning(
                        "scheduler: %s did not answer (%r); learning again in %g s",
                        what_failed(exc),
                        exc,
                        LEARN_EVERY_S,
                    )
            try:
                async with asyncio.timeout(LEARN_EVERY_S):
                    await self.stopping.wait()
            except TimeoutError:
                pass
        if self.planning is not None:
            self.planning.cancel()

    async def learn_once(self) -> None:
        await self.read_finished()
        now = time.time()
        await self.read_arrivals(now)
        reason = self.brain.trigger(len(self.heard), self.pin_set, now)
        if reason and self.planning is None and time.monotonic() >= self._retry_at:
            self.planning = asyncio.create_task(self._replan(reason))
        await self.write_state(now)
        if self.brain.calibrator is not None and self.looks % CALIBRATION_EVERY == 0:
            await self.store.set(self.names.calibration, self.brain.calibrator.dumps())
        self.looks += 1
        self.learned.set()

    async def read_arrivals(self, now: float) -> None:
        """The gateways' per-second arrival counts of the last ``LONG_S`` whole seconds."""
        second = int(now)
        values = await self.store.get_many(*(self.names.arrivals(s) for s in range(second - LONG_S, second)))
        self.brain.observe_arrivals([int(v) if v is not None else 0 for v in values], now)

    async def read_finished(self) -> int:
        """Feed the finish records workers left since the last look to the statistics."""
        count = READ_FIRST
        while True:
            samples = await recent_lengths(self.store, self.names, count)
            if not samples or self.brain.seen(samples[0].request_id):
                return 0
            if self.brain.seen(samples[-1].request_id) or len(samples) < count or count >= OUTPUT_LENGTHS_MAX:
                return self.brain.ingest(samples[::-1])  # oldest first
            count = min(count * 4, OUTPUT_LENGTHS_MAX)

    async def _replan(self, reason: str) -> None:
        """Search off the event loop; publish the plan if it is worth it."""
        workers, running = len(self.heard), self.target
        span = [time.time(), math.inf]
        self.searches.append(span)
        try:
            now = time.time()
            inputs, rate = self.brain.inputs(reason, now), self.brain.stats.arrival_rate(now)
            decision = await asyncio.get_running_loop().run_in_executor(
                self.searching, self.brain.decide, reason, workers, running, inputs, rate
            )
        except Exception as exc:  # a search that fails keeps the schedule in force; tried again later
            if isinstance(exc, (PlanningError, ValueError)):
                log.warning("scheduler: search (%s) failed: %s", reason, exc)
            else:
                log.exception("scheduler: search (%s) failed", reason)
            self._retry_at = time.monotonic() + max(self.config.replan_interval_s, 1.0)
            self.brain.forced = None
            return
        finally:
            self.planning = None
            span[1] = time.time()
        self.brain.adopt(decision, time.time())
        self.last_decision = decision
        if decision.publish and not self.pin_set:
            self.target = decision.plan.schedule
            await self.reconcile()
        log.info(
            "scheduler: %s: %s %s (%s)",
            reason,
            "published" if decision.publish else "kept the schedule",
            decision.plan.schedule.policy,
            decision.why,
        )
        await self.write_state(time.time())
        self.decided.set()

    def state(self, now: float) -> SchedulerState:
        update = self.current
        return self.brain.state(
            leader=self.worker_id,
            token=update.token if update else 0,
            version=update.version if update else 0,
            schedule=self.target,
            pinned=self.pin_set,
            workers=len(self.heard),
            now=now,
        )

    async def write_state(self, now: float) -> None:
        await self.store.set(self.names.scheduler_state, codec.encode(self.state(now)))

    # --- decide and publish -------------------------------------------------------------------
    async def pin(self, schedule: Schedule | None) -> ScheduleUpdate | None:
        """Run ``schedule`` from now on (None: back to the default); returns what was published."""
        self.pin_set = schedule is not None
        self.target = schedule or (self.brain.plan.schedule if self.brain.plan else DEFAULT)
        pin = PinSchedule(None if schedule is None else wire_schedule(schedule), time.time())
        await self.store.set(self.names.pinned_schedule, codec.encode(pin))
        published = await self.reconcile()
        await self.write_state(time.time())  # the record says pinned with the version it made, not a look later
        return published

    def expire(self) -> None:
        """Forget workers silent for longer than the heartbeat timeout."""
        limit = time.monotonic() - self.config.heartbeat_timeout_s
        for worker_id in [w for w, at in self.heard.items() if at < limit]:
            self.heard.pop(worker_id)
            self.workers.pop(worker_id, None)
            self._changed.set()

    async def _keep_allocated(self) -> None:
        """Re-allocate when workers join or leave; look for silent ones every heartbeat."""
        while not self.stopping.is_set():
            try:
                async with asyncio.timeout(self.config.heartbeat_s):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()
            self.expire()
            await self.reconcile()

    async def reconcile(self) -> ScheduleUpdate | None:
        """Publish a new version if the schedule to run or the roles of the live workers changed."""
        previous = {a.worker_id: a.role for a in self.current.allocation} if self.current else {}
        allocation = allocate(self.target, list(self.heard), previous)
        if self.current is not None and (self.current.schedule, self.current.allocation) == (
            wire_schedule(allocation.schedule),
            allocation.roles,
        ):
            return None
        self.allocation = allocation
        return await self._publish(allocation)

    async def _publish(self, allocation: Allocation) -> ScheduleUpdate | None:
        """Make ``allocation`` the next version: in the store, then to every worker; stamped with
        this term's epoch, token and lease. None, and nothing published, unless this process holds
        the lease: the store write is fenced by it, and a refused write ends the term."""
        lead = self.leadership
        if not await lead.secure():
            return None
        version = await self.store.add(self.names.schedule_version, 1)
        update = ScheduleUpdate(
            version,
            wire_schedule(allocation.schedule),
            allocation.roles,
            time.time(),
            epoch=lead.epoch,
            token=lead.token,
            lease_until=lead.lease_until,
        )
        body = codec.encode(update)
        if not await self.store.set_while_leased(
            self.names.schedule, body, lease_key=self.names.scheduler_lease, owner=lead.owner
        ):
            self.refused += 1
            await lead.lose()
            return None
        self.current = update
        await self.bus.broadcast(self.names.control_exchange, body)
        self.published.set()
        return self.current


def _planned_or_none(spec: ScheduleSpec | None) -> Schedule | None:
    """A stored schedule as the planner's; None for none, or one this version's planner refuses."""
    if spec is None:
        return None
    try:
        return planned(spec)
    except ValueError as exc:
        log.warning("scheduler: the stored schedule is not one this version runs (%s); not kept", exc)
        return None
