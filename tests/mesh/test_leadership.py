"""One scheduler leads at a time: a lease, fencing tokens, store epochs; workers fence out the rest.

In memory and over the real RabbitMQ and Redis: two schedulers, a leader that stops renewing, a
standby that takes over, a deposed leader whose publish is refused, a store that loses its data;
and two scheduler processes, the leader stopped (SIGSTOP) past its lease and then resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from common.config import MeshConfig
from common.messages import codec
from common.messages.control import ControlMessage, ScheduleUpdate
from common.messages.schedule import ScheduleSpec
from common.messages.status import WorkerStatus
from common.names import Names
from common.scheduling import current_schedule
from common.transport.connect import LocalHub, Transports, open_store, open_transports, purge
from optimizer.schedule import Schedule
from services.hosting.engines import EngineRunner
from services.run.embedded import LocalMesh, local_workers, until_ready
from services.scheduler.leadership import Leadership
from services.scheduler.service import SchedulerService
from services.worker.follower import ScheduleFollower
from tests.brokers import AMQP_URL, REDIS_URL, require_broker
from tests.mesh.conftest import until
from tests.mesh.fake_engine import FakeEngine
from tests.mesh.processes import ProcessMesh

FAKE = "tests.mesh.fake_engine:load"
TTL_S = 0.8


@pytest.fixture
def config(mesh_config: MeshConfig) -> MeshConfig:
    return mesh_config.model_copy(update={"model": FAKE, "lease_ttl_s": TTL_S})


@contextlib.asynccontextmanager
async def schedulers(config: MeshConfig, hub: LocalHub, count: int) -> AsyncIterator[list[SchedulerService]]:
    """``count`` scheduler services, started one after the other (the first one leads)."""
    started: list[SchedulerService] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(count):
            own = config.model_copy(update={"worker_id": f"sched{i}-{config.namespace}"})
            service = SchedulerService(own, await open_transports(own, Names(own.namespace), hub))
            tasks.append(asyncio.create_task(service.run()))
            started.append(service)
            await until_ready([service.ready], tasks)
        yield started
    finally:
        for service in started:
            service.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)


@contextlib.asynccontextmanager
async def one_worker(config: MeshConfig, hub: LocalHub) -> AsyncIterator[LocalMesh]:
    async with local_workers(config, hub, runners=[EngineRunner(FakeEngine())], scheduler=False) as mesh:
        yield mesh


class Listener:
    """An observer on the control exchange that follows every update with a real follower."""

    def __init__(self, transports: Transports, names: Names) -> None:
        self.transports, self.names = transports, names
        self.follower = ScheduleFollower("listener", 64, 64)
        self.received: list[tuple[ScheduleUpdate, bool]] = []  # each update, and whether it was applied
        self.heard = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        subscription = await self.transports.bus.subscribe(
            self.names.control_exchange, self.names.control_queue("listener")
        )
        self._task = asyncio.create_task(self._pump(subscription))

    async def _pump(self, subscription) -> None:
        async for delivery in subscription:
            message = codec.decode(delivery.body, ControlMessage)
            if isinstance(message, ScheduleUpdate):
                applied = self.follower.offer(message) and self.follower.take() is not None
                self.received.append((message, applied))
                self.heard.set()
            await delivery.ack()

    def applied(self) -> list[ScheduleUpdate]:
        return [u for u, ok in self.received if ok]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.transports.close()


def has(worker_id: str, update: ScheduleUpdate | None) -> bool:
    return update is not None and worker_id in {a.worker_id for a in update.allocation}


@pytest.mark.usefixtures("cleanup")
async def test_a_term_ends_when_another_began_even_if_the_lease_is_free_again(config, hub):
    store = await open_store(config) or hub.store
    names = Names(config.namespace)
    a, b = Leadership(store, names, "same-name", 0.3), Leadership(store, names, "same-name", 0.3)
    before = time.time()
    assert await a.try_acquire() and not await b.try_acquire()  # one name, two runs: one lease holder
    assert a.token == 1 and a.epoch >= int(before * 1000) and a.holds()
    assert before + 0.3 <= a.lease_until <= time.time() + 0.3  # never later than the store's expiry
    deadline = time.monotonic() + 10
    while await store.get(names.scheduler_lease) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # ``a`` stalls: polling the lease's expiry in the store, bounded
    assert await b.try_acquire() and (b.token, b.epoch) == (2, a.epoch)
    await b.release()
    assert not await a.renew()  # the lease is free again, but another term began meanwhile
    assert not a.leading and await store.get(names.scheduler_lease) is None
    assert await a.try_acquire() and a.token == 3
    await a.release()
    await store.close()


@pytest.mark.usefixtures("cleanup")
async def test_one_leads_the_other_takes_over_and_the_deposed_one_is_fenced_out(config, hub):
    names = Names(config.namespace)
    listener = Listener(await open_transports(config, names, hub), names)
    await listener.start()
    async with schedulers(config, hub, 2) as (first, second), one_worker(config, hub) as mesh:
        worker = mesh.workers[0]
        assert first.leadership.leading and not second.leadership.leading
        assert await first.store.get(names.scheduler_lease) == first.leadership.owner.encode()
        assert first.leadership.owner.startswith(first.worker_id)
        await until(
            lambda: has(worker.worker_id, first.current) and worker.follower.version == first.current.version,
            [first.published, worker.changed],
        )
        assert (first.current.token, second.current) == (1, None)  # the standby publishes nothing

        # The leader stalls: it stops renewing, and its clock stands still, so it believes it leads.
        async def stalled() -> bool:
            return True

        frozen = time.time()
        first.leadership.renew = stalled  # type: ignore[method-assign]
        first.leadership.clock = lambda: frozen
        stalled_at = time.monotonic()
        await until(lambda: second.leadership.leading and second.current is not None, [second.published])
        assert time.monotonic() - stalled_at < 2 * TTL_S + 1.0  # within about one TTL
        takeover = second.current
        assert takeover.token == 2 and takeover.version > first.current.version
        assert await first.store.get(names.scheduler_lease) == second.leadership.owner.encode()

        # A worker joins: both hear it; the deposed leader's publish is refused by the fenced write.
        joiner = WorkerStatus("joiner", "idle", 0, 0, 0, "ready", time.time())
        await second.bus.broadcast(names.status_exchange, codec.encode(joiner))
        await until(
            lambda: has("joiner", second.current) and not first.leadership.leading, [second.published, listener.heard]
        )
        assert first.refused == 1 and second.refused == 0
        await until(lambda: listener.follower.version >= second.current.version, [listener.heard])
        stored = await current_schedule(first.store, names)
        assert stored == second.current and stored.token == 2
        await until(lambda: worker.follower.version == second.current.version, [worker.changed])
        assert worker.follower.update.token == 2 and worker.follower.rejections == 0
    await listener.close()
    versions = [u.version for u, _ in listener.received]
    assert versions == sorted(set(versions))  # strictly increasing across the takeover
    after = versions.index(takeover.version)
    assert all(u.token == 2 for u, _ in listener.received[after:])  # the deposed leader sent nothing
    assert all(ok for _, ok in listener.received)


@pytest.mark.usefixtures("cleanup")
async def test_a_worker_rejects_updates_from_a_deposed_leader_or_past_their_lease(config, hub):
    names = Names(config.namespace)
    async with schedulers(config, hub, 1) as (leader,), one_worker(config, hub) as mesh:
        worker = mesh.workers[0]
        await until(
            lambda: has(worker.worker_id, leader.current) and worker.follower.version == leader.current.version,
            [leader.published, worker.changed],
        )
        now = leader.current
        older_term = dataclasses.replace(
            now, version=now.version + 10, token=now.token - 1, schedule=ScheduleSpec("rra")
        )
        past_lease = dataclasses.replace(
            now, version=now.version + 11, lease_until=time.time() - 0.1, schedule=ScheduleSpec("rra")
        )
        for stale in (older_term, past_lease):
            await leader.bus.broadcast(names.control_exchange, codec.encode(stale))
        update = await leader.pin(Schedule("continuous", encode_batch=2, decode_batch=4))  # queued behind them
        assert update is not None and update.version > now.version
        await until(lambda: worker.follower.version == update.version, [worker.changed])
        assert worker.follower.rejected == {"fenced": 1, "late": 1, "invalid": 0}
        assert worker.follower.schedule.policy == "continuous" and worker.follower.update.token == now.token


@pytest.mark.usefixtures("cleanup")
async def test_a_store_that_lost_its_data_gets_a_later_epoch_which_workers_follow(config, hub):
    names = Names(config.namespace)
    async with schedulers(config, hub, 1) as (leader,), one_worker(config, hub) as mesh:
        worker = mesh.workers[0]
        await until(
            lambda: has(worker.worker_id, leader.current) and worker.follower.version == leader.current.version,
            [leader.published, worker.changed],
        )
        for _ in range(3):  # a few more versions in the old store
            await leader.pin(Schedule("continuous", encode_batch=2 + _, decode_batch=4))
        old = leader.current
        await until(lambda: worker.follower.version == old.version, [worker.changed])
        await leader.store.delete_prefix(names.key_prefix)  # Redis restarted empty
        await until(lambda: worker.follower.update.epoch > old.epoch, [worker.changed], timeout_s=10 * TTL_S)
        fresh = worker.follower.update
        assert (fresh.version, fresh.token) == (1, 1) and fresh.version < old.version
        assert has(worker.worker_id, fresh) and leader.leadership.terms == 2
        assert await current_schedule(leader.store, names) == fresh
        assert worker.follower.rejections == 0


# --- two scheduler processes; the leader stopped past its lease ------------------------------------


async def heartbeats(transports: Transports, names: Names, worker_id: str, stop: asyncio.Event, every_s: float) -> None:
    """A worker's status reports (as a worker process sends them) until ``stop``; then "stopping"."""

    def status(state: str) -> bytes:
        return codec.encode(WorkerStatus(worker_id, "worker", 0, 0, 0, state, time.time()))

    while not stop.is_set():
        await transports.bus.broadcast(names.status_exchange, status("alive"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every_s):
                await stop.wait()
    await transports.bus.broadcast(names.status_exchange, status("stopping"))


@pytest.mark.broker
async def test_a_leader_stopped_past_its_lease_cannot_get_an_update_applied():
    """Two ``exegpt scheduler`` processes; the leader is stopped (SIGSTOP) until the standby has
    taken over and published; a worker joins meanwhile, so the old leader wants to publish the
    moment it resumes (SIGCONT). It gets nothing applied: the listener's follower applies only the
    new term's updates, and the store holds the new leader's schedule."""
    require_broker()
    config = MeshConfig(
        namespace=f"l{uuid.uuid4().hex[:10]}",
        amqp_url=AMQP_URL,
        redis_url=REDIS_URL,
        lease_ttl_s=1.0,
        heartbeat_s=0.2,
        heartbeat_timeout_s=5.0,
    )
    names = Names(config.namespace)
    procs = ProcessMesh({f"EXEGPT_{k.upper()}": str(v) for k, v in config.model_dump().items() if v is not None})
    transports = await open_transports(config, names, LocalHub())
    listener = Listener(await open_transports(config, names, LocalHub()), names)
    stops = {"listener": asyncio.Event(), "joiner": asyncio.Event()}
    beats: list[asyncio.Task[None]] = []
    try:
        pair = [procs.start("scheduler"), procs.start("scheduler")]
        ids = [(await asyncio.to_thread(p.wait_line, "ready", 60)).split()[-1] for p in pair]
        holder = (await transports.store.get(names.scheduler_lease) or b"").decode()
        leader, standby = pair if holder.startswith(ids[0] + "/") else pair[::-1]
        standby_id = ids[pair.index(standby)]
        await transports.bus.declare_fanout(names.status_exchange)
        await listener.start()
        beats.append(asyncio.create_task(heartbeats(transports, names, "listener", stops["listener"], 0.2)))
        await until(lambda: has("listener", listener.follower.update), [listener.heard], 15)
        old_token = listener.follower.update.token

        leader.popen.send_signal(signal.SIGSTOP)
        line = await asyncio.to_thread(standby.wait_line, "leading", 15)  # "leading scheduler <id> token <n>"
        new_token = int(line.split()[-1])
        assert new_token > old_token
        await until(lambda: listener.follower.update.token == new_token, [listener.heard], 15)
        takeover = next(i for i, (u, _) in enumerate(listener.received) if u.token == new_token)
        beats.append(asyncio.create_task(heartbeats(transports, names, "joiner", stops["joiner"], 0.2)))
        await until(lambda: has("joiner", listener.follower.update), [listener.heard], 15)

        leader.popen.send_signal(signal.SIGCONT)  # its reconcile (a worker joined) and renewal fire now
        await asyncio.to_thread(leader.wait_line, "standby", 30)  # it found its term over
        stops["joiner"].set()  # a last update from the new leader: it follows anything the old one sent
        await until(lambda: not has("joiner", listener.follower.update), [listener.heard], 15)

        after = listener.received[takeover:]
        assert all(u.token == new_token for u, ok in after if ok)  # nothing of the old term applied
        from_old = [u for u, _ in after if u.token < new_token]
        assert listener.follower.rejections == len(from_old)  # whatever it sent was rejected
        applied = [u.version for u in listener.applied()]
        assert applied == sorted(set(applied))
        stored = await current_schedule(transports.store, names)
        assert stored is not None and (stored.token, stored.version) == (new_token, listener.follower.version)
        assert (await transports.store.get(names.scheduler_lease) or b"").decode().startswith(standby_id + "/")
        assert leader.popen.poll() is None  # still running, standing by
    finally:
        for stop in stops.values():
            stop.set()
        await asyncio.gather(*beats, return_exceptions=True)
        for proc in procs.procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)  # a stopped process would not see SIGTERM
        await asyncio.to_thread(procs.close)
        await listener.close()
        await transports.bus.delete(queues=[names.scheduler_queue], exchanges=[])  # purge leaves it
        await transports.close()
        await purge(config, names, LocalHub())


async def test_a_learning_step_that_meets_an_outage_logs_one_line_and_a_fault_its_traceback(caplog):
    import logging

    config = MeshConfig(namespace=f"learn-{uuid.uuid4().hex[:8]}", threads=1)
    service = SchedulerService(config, await open_transports(config, Names(config.namespace), LocalHub()))
    raised = [ConnectionError("store gone"), ValueError("a bug")]

    async def learn_once() -> None:
        if raised:
            raise raised.pop(0)
        service.stopping.set()  # both were logged: the loop may end

    service.learn_once = learn_once
    service.stopping.clear()
    with caplog.at_level(logging.WARNING, logger="exegpt.scheduler"):
        await asyncio.wait_for(service._learn(), 30)
    records = [r for r in caplog.records if r.name == "exegpt.scheduler"]
    assert [(r.levelname, r.exc_info is not None) for r in records] == [("WARNING", False), ("ERROR", True)]
    assert "the message broker or the store did not answer" in records[0].getMessage()
