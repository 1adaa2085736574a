"""One message never stops a consumer: poison messages go to the dead queue with their reason,
their requests fail to their clients, deliveries are counted, and `exegpt dlq` handles them.

Each case runs on the in-memory transport and on RabbitMQ + Redis (``transport_kind``)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from common.jobs import ReplyCollector, job_id, new_batch_id
from common.messages import codec
from common.messages.control import PinSchedule
from common.messages.events import EventBatch
from common.messages.handoff import KvReady
from common.messages.jobs import BatchJob, JobResult
from common.messages.schedule import ScheduleSpec
from common.messages.work import EncodeWork, Sampling
from common.names import Names
from common.scheduling import DEFAULT_SCHEDULE
from common.transport.batchdir import BatchDir
from common.transport.connect import open_bus, open_transports
from common.transport.kv import KvPayload, StoreKv
from engine.api import GenerationRequest
from optimizer.policies import StepPlan
from services.batch.consumer import ConsumerConfig, JobConsumer
from services.batch.executor import EchoExecutor
from services.cli.dlq import act
from services.worker.executor import run_step
from tests.mesh.conftest import running_mesh, until
from tests.mesh.fake_engine import FakeEngine, load

pytestmark = pytest.mark.usefixtures("cleanup")
FAKE = "tests.mesh.fake_engine:load"
TIMEOUT_S = 30
LONG = "x" * 300  # no broker routes a name this long


@pytest.fixture
def config(mesh_config):
    return mesh_config.model_copy(update={"model": FAKE})


def completion(prompt: str, n: int) -> dict:
    return {"model": FAKE, "prompt": prompt, "max_tokens": n, "temperature": 0}


async def next_of(subscription):
    return await asyncio.wait_for(anext(aiter(subscription)), TIMEOUT_S)


async def dead_letters(bus, names: Names, count: int) -> list:
    """The next ``count`` dead messages (acked)."""
    dead = await bus.consume(names.dead_queue, prefetch=count)
    got = [await next_of(dead) for _ in range(count)]
    for delivery in got:
        await delivery.ack()
    await dead.cancel()
    return got


async def still_serves(m) -> None:
    response = await m.client.post("/v1/completions", json=completion("still", 3))
    assert response.status_code == 200, response.text
    assert not any(t.done() for t in m.mesh.tasks)  # no worker, no scheduler stopped


async def events_queue(t, names: Names, name: str):
    queue = names.events_queue(name)
    await t.bus.declare_queue(queue, exclusive=True)
    return queue, await t.bus.consume(queue, prefetch=10, auto_ack=True)


async def next_failure(events):
    while True:
        batch = codec.decode((await next_of(events)).body, EventBatch)
        if batch.failures:
            return batch.failures[0]


# --- the worker's queues -------------------------------------------------------------------------


async def test_undecodable_work_and_handoffs_are_dead_lettered_and_the_worker_goes_on(config, hub):
    names = Names(config.namespace)
    async with running_mesh(config, hub, load) as m:  # a "worker" consumes both queues
        t = await open_transports(config, names, hub)
        await t.bus.publish(names.encode_queue, b"\x93garbage")
        await t.bus.publish(names.handoff_queue, b"\x00\x01")
        dead = await dead_letters(t.bus, names, 2)
        origins = {d.headers["x-exegpt-queue"]: d for d in dead}
        assert set(origins) == {names.encode_queue, names.handoff_queue}
        assert all(d.headers["x-exegpt-reason"].startswith("undecodable: ") for d in dead)
        assert origins[names.encode_queue].body == b"\x93garbage"
        await still_serves(m)
        await t.close()


# bytes that are no payload, and a payload whose header (the engine's part) is not a hand-off
UNREADABLE = [
    b"not a kv cache",
    KvPayload("r-corrupt", b"not a header", b"\0" * 64, "float32", (16,), "raw", 1).to_bytes(),
]


@pytest.mark.parametrize("stored", UNREADABLE, ids=["payload", "header"])
async def test_a_corrupt_kv_handoff_fails_its_request_and_the_worker_goes_on(config, hub, stored):
    names = Names(config.namespace)
    async with running_mesh(config, hub, load) as m:
        t = await open_transports(config, names, hub)
        for worker in m.mesh.workers:  # in memory too: payload bytes in the store, as across hosts
            worker.kv = StoreKv(worker.store, names)
        queue, events = await events_queue(t, names, "client")
        ref = names.kv_payload("r-corrupt")
        await t.store.set(ref, stored, ttl_s=60)
        await t.bus.publish(names.handoff_queue, codec.encode(KvReady("r-corrupt", "enc", queue, ref, 3, 0, 0.0)))
        failure = await next_failure(events)
        assert (failure.request_id, failure.status) == ("r-corrupt", 500)
        assert "corrupt KV payload" in failure.message and "dead queue" in failure.message
        [dead] = await dead_letters(t.bus, names, 1)
        assert dead.headers["x-exegpt-reason"].startswith("corrupt KV payload: ")
        assert dead.headers["x-exegpt-queue"] == names.handoff_queue
        await still_serves(m)
        await t.close()


async def test_a_reply_to_no_broker_routes_is_dead_lettered_and_the_worker_goes_on(config, hub):
    names = Names(config.namespace)
    async with running_mesh(config, hub, load) as m:
        t = await open_transports(config, names, hub)
        work = EncodeWork("r-long", FAKE, (104, 105), Sampling(3), LONG, 0.0)
        ready = KvReady("r-long-h", "enc", LONG, names.kv_payload("r-long-h"), 2, 0, 0.0)
        await t.bus.publish(names.encode_queue, codec.encode(work))
        await t.bus.publish(names.handoff_queue, codec.encode(ready))
        dead = await dead_letters(t.bus, names, 2)
        assert all("routing key too long: 300 bytes" in d.headers["x-exegpt-reason"] for d in dead)
        await still_serves(m)
        await t.close()


def out_of_bounds(work: EncodeWork, field: int, value) -> bytes:
    """``work`` on the wire with one field of its sampling set to ``value`` (no check lets such
    a message be built: it is what a producer without the checks would send)."""
    version, tag, *fields = msgpack.unpackb(codec.encode(work))
    fields[3][field] = value  # EncodeWork.sampling
    return msgpack.packb([version, tag, *fields])


@pytest.mark.parametrize(
    "field, value, named",
    [(0, 0, "max_tokens"), (0, -4, "max_tokens"), (2, 2**63, "top_k"), (1, float("nan"), "temperature")],
)
async def test_work_with_sampling_out_of_bounds_fails_to_its_requester_and_is_dead_lettered(
    config, hub, field, value, named
):
    names = Names(config.namespace)
    async with running_mesh(config, hub, load) as m:
        t = await open_transports(config, names, hub)
        queue, events = await events_queue(t, names, "client")
        work = EncodeWork("r-bounds", FAKE, (104, 105), Sampling(3), queue, 0.0)
        await t.bus.publish(names.encode_queue, out_of_bounds(work, field, value))
        failure = await next_failure(events)
        assert (failure.request_id, failure.status) == ("r-bounds", 400)
        assert named in failure.message, failure.message
        [dead] = await dead_letters(t.bus, names, 1)
        assert dead.headers["x-exegpt-reason"].startswith("invalid sampling: ")
        await still_serves(m)
        await t.close()


class FaultyEngine(FakeEngine):
    """Fails every step that prefills a prompt beginning with "poison" (an engine fault)."""

    def __init__(self) -> None:
        super().__init__()
        self.faults = 0

    def step(self, prefill=(), decode=(), padding=0):
        if any(bytes(r.prompt_ids[:6]) == b"poison" for r in prefill):
            self.faults += 1
            raise RuntimeError("poisoned prompt")
        return super().step(prefill, decode, padding)


def test_a_step_that_faults_on_one_new_request_runs_the_others_without_it():
    """The engine faults on a step holding a poisoned prompt: the running request and the other
    new one still take their step (tokens as without the poison), and only the poisoned one is
    reported (the worker gives it back, or fails it at its last attempt)."""
    engine = FaultyEngine()
    running, fine, poison = (
        GenerationRequest(rid, tuple(prompt), Sampling(4))
        for rid, prompt in (("running", b"run"), ("fine", b"fine"), ("poison", b"poison pill"))
    )
    engine.step([running])
    result = run_step(
        engine,
        StepPlan(encode=("fine", "poison"), decode=("running",)),
        {"fine": fine, "poison": poison},
        {},
        export=None,
    )
    assert list(result.faulted) == ["poison"] and "poisoned prompt" in result.faulted["poison"]
    assert not result.refused and not result.failed and not result.given_back
    assert sorted(e.request_id for e in result.events) == ["fine", "running"]
    assert sorted(engine.batch) == ["fine", "running"]

    alone = FaultyEngine()
    result = run_step(alone, StepPlan(encode=("poison",)), {"poison": poison}, {}, export=None)
    assert list(result.faulted) == ["poison"] and alone.faults == 1  # not run again to be sure


async def test_a_request_failing_at_every_attempt_fails_to_its_client_once_the_limit_is_reached(config, hub):
    names = Names(config.namespace)
    async with running_mesh(config, hub, FaultyEngine) as m:
        response = await m.client.post("/v1/completions", json=completion("poison pill", 3))
        assert response.status_code == 500 and "engine fault" in response.text
        assert m.mesh.workers[0].runner.engine.faults == config.delivery_limit  # one step per attempt
        t = await open_transports(config, names, hub)
        [dead] = await dead_letters(t.bus, names, 1)
        assert dead.headers["x-exegpt-reason"].startswith("failed: engine fault: ")
        assert dead.headers["x-exegpt-attempts"] == str(config.delivery_limit)
        await still_serves(m)
        await t.close()


async def test_work_whose_consumers_died_holding_it_fails_to_its_client(config, hub):
    """Handed out ``delivery_limit`` times to consumers that died with it: the next worker does
    not run it again; it goes to the dead queue, and its client hears why."""
    names = Names(config.namespace)
    t = await open_transports(config, names, hub)
    await t.bus.declare_queue(names.encode_queue)
    queue, events = await events_queue(t, names, "client")
    await t.bus.publish(names.encode_queue, codec.encode(EncodeWork("r-killer", FAKE, (104,), Sampling(3), queue, 0.0)))
    for attempt in range(1, config.delivery_limit + 1):
        dying = await open_bus(config, names, hub)
        delivery = await next_of(await dying.consume(names.encode_queue, prefetch=1))
        assert delivery.attempts == attempt
        await dying.close()  # dies holding it
    async with running_mesh(config, hub, load) as m:
        failure = await next_failure(events)
        assert (failure.request_id, failure.status) == ("r-killer", 500)
        assert "delivery limit 3 reached" in failure.message
        [dead] = await dead_letters(t.bus, names, 1)
        assert dead.headers["x-exegpt-reason"] == "delivery limit 3 reached"
        assert m.mesh.workers[0].steps == 0  # it never ran
        await still_serves(m)
    await t.close()


# --- delivery attempts, on the bus -----------------------------------------------------------------


async def test_attempts_are_counted_across_redeliveries_and_a_give_back_is_not_one(config, hub):
    names = Names(config.namespace)
    bus = await open_bus(config, names, hub)
    await bus.declare_queue(names.handoff_queue)
    await bus.publish(names.handoff_queue, b"m")
    sub = await bus.consume(names.handoff_queue, prefetch=1)
    first = await next_of(sub)
    assert (first.attempts, first.redelivered) == (1, False)
    await first.release()  # given back unstarted: not an attempt
    again = await next_of(sub)
    assert (again.attempts, again.redelivered) == (1, True)
    await again.reject(requeue=True)  # a failed attempt
    third = await next_of(sub)
    assert third.attempts == 2
    await sub.cancel()
    await bus.close()  # dies holding it: an attempt
    told: list[str] = []
    gone = asyncio.Event()

    async def on_dead(delivery, reason):
        told.append(reason)
        gone.set()

    survivor = await open_bus(config, names, hub)
    last = await next_of(await survivor.consume(names.handoff_queue, prefetch=1))
    assert last.attempts == 3 == last.limit
    await survivor.close()  # dies holding it: past the limit now
    reader = await open_bus(config, names, hub)
    sub = await reader.consume(names.handoff_queue, prefetch=1, on_dead=on_dead)
    waiting = asyncio.create_task(next_of(sub))
    await asyncio.wait_for(gone.wait(), TIMEOUT_S)
    assert told == ["delivery limit 3 reached"] and not waiting.done()
    [dead] = await dead_letters(reader, names, 1)
    assert (dead.body, dead.headers["x-exegpt-attempts"]) == (b"m", "4")
    waiting.cancel()
    await reader.close()


async def test_the_dead_queue_is_bounded_dropping_the_oldest(config, hub):
    config = config.model_copy(update={"dead_queue_max": 5})
    names = Names(config.namespace)
    bus = await open_bus(config, names, hub)
    await bus.declare_queue(names.encode_queue)
    sub = await bus.consume(names.encode_queue, prefetch=20)
    for i in range(8):
        await bus.publish(names.encode_queue, b"%d" % i)
        await (await next_of(sub)).dead_letter(f"poison {i}")
    assert await bus.queue_depth(names.dead_queue) == 5
    dead = await dead_letters(bus, names, 5)
    assert [d.body for d in dead] == [b"3", b"4", b"5", b"6", b"7"]
    await bus.close()


@pytest.mark.parametrize("transport_kind", [pytest.param("broker", marks=pytest.mark.broker)])
async def test_an_unbounded_dead_queue_from_before_is_replaced_once_empty(config, hub, caplog, transport_kind):
    import aio_pika

    from tests.brokers import require_broker

    require_broker()
    names = Names(config.namespace)
    connection = await aio_pika.connect(config.amqp_url)
    channel = await connection.channel()
    await channel.declare_queue(names.dead_queue, durable=True)  # as earlier versions declared it
    await channel.default_exchange.publish(aio_pika.Message(b"old"), routing_key=names.dead_queue)
    bus = await open_bus(config, names, hub)  # not empty: kept (unbounded) with a warning
    assert "without a length bound" in caplog.text
    assert [m.body for m in await act_list(bus, names)] == [b"old"]
    assert (await act(bus, names, "purge", None)) == [f"purged 1 dead messages from {names.dead_queue}"]
    await bus.close()
    bus = await open_bus(config, names, hub)  # empty: replaced by the bounded one
    probe = await connection.channel()
    await probe.declare_queue(
        names.dead_queue, durable=True, arguments={"x-max-length": config.dead_queue_max, "x-overflow": "drop-head"}
    )
    await bus.close()
    await connection.close()


async def act_list(bus, names):
    from common.transport.dead import DeadQueue

    dead = DeadQueue(bus, names)
    messages = await dead.take()
    await dead.give_back()
    return messages


# --- the scheduler's queue -------------------------------------------------------------------------


async def test_poison_scheduler_requests_are_dead_lettered_and_the_scheduler_goes_on(config, hub, monkeypatch):
    names = Names(config.namespace)
    async with running_mesh(config, hub, load) as m:
        scheduler = m.mesh.scheduler
        t = await open_transports(config, names, hub)
        await t.bus.publish(names.scheduler_queue, b"\xc1 not msgpack")
        [dead] = await dead_letters(t.bus, names, 1)
        assert dead.headers["x-exegpt-reason"].startswith("undecodable: ")
        assert dead.headers["x-exegpt-queue"] == names.scheduler_queue
        await t.bus.publish(names.scheduler_queue, codec.encode(PinSchedule(ScheduleSpec("fcfs"), 0.0)))
        [dead] = await dead_letters(t.bus, names, 1)  # refused once: the planner's rules do not change on retry
        assert (
            dead.headers["x-exegpt-reason"].startswith("invalid schedule: ")
            and "fcfs" in dead.headers["x-exegpt-reason"]
        )

        pin, calls = scheduler.pin, []

        async def failing_pin(schedule):
            calls.append(schedule)
            raise RuntimeError("store said no")

        monkeypatch.setattr(scheduler, "pin", failing_pin)
        await t.bus.publish(names.scheduler_queue, codec.encode(PinSchedule(DEFAULT_SCHEDULE, 0.0)))
        [dead] = await dead_letters(t.bus, names, 1)
        assert dead.headers["x-exegpt-reason"] == (
            "delivery limit 3 reached; last: handler raised RuntimeError: store said no"
        )
        assert len(calls) == config.delivery_limit
        monkeypatch.setattr(scheduler, "pin", pin)
        wanted = DEFAULT_SCHEDULE.__class__("continuous", encode_batch=4, decode_batch=16, worker_devices=1)
        await t.bus.publish(names.scheduler_queue, codec.encode(PinSchedule(wanted, 0.0)))
        await until(
            lambda: scheduler.current is not None and scheduler.current.schedule == wanted, [scheduler.published]
        )
        await still_serves(m)
        await t.close()


# --- the batch jobs queue ----------------------------------------------------------------------------


class FailingExecutor:
    """Raises (an internal error) for jobs whose prompt starts with "poison"; echoes the rest."""

    def __init__(self) -> None:
        self.calls = 0

    async def execute(self, job):
        if job.prompt.startswith("poison"):
            self.calls += 1
            raise RuntimeError("executor crashed")
        return await EchoExecutor().execute(job)


async def start_jobs(config, names, hub, data, executor, handled: list, changed: asyncio.Event):
    def on_handled(result, stored):
        handled.append(result.job_id)
        changed.set()

    bus = await open_bus(config, names, hub)
    consumer = JobConsumer(
        bus, data, names, executor, ConsumerConfig("c1", max_inflight=4, drain_timeout_s=2), on_handled=on_handled
    )
    stop = asyncio.Event()
    return bus, consumer, stop, asyncio.create_task(consumer.run(stop))


async def test_poison_jobs_are_dead_lettered_or_failed_and_the_consumer_goes_on(config, hub):
    names = Names(config.namespace)
    data = BatchDir(config.batch_dir, config.namespace)
    producer = await open_bus(config, names, hub)
    batch, reply = new_batch_id(), names.reply_queue("test")
    await producer.declare_queue(reply)
    await producer.declare_queue(names.jobs_queue)
    collector = await ReplyCollector(producer, reply).start()

    def job(i: int, prompt: str, reply_to: str = reply) -> BatchJob:
        return BatchJob(job_id(batch, i), "tiny", "completion", prompt, (), Sampling(2), reply_to, batch, 0.0)

    # consumers died holding job 0 as often as the limit allows
    await producer.publish(names.jobs_queue, codec.encode(job(0, "killer")))
    for _ in range(config.delivery_limit):
        dying = await open_bus(config, names, hub)
        await next_of(await dying.consume(names.jobs_queue, prefetch=1))
        await dying.close()
    executor = FailingExecutor()
    handled: list[str] = []
    changed = asyncio.Event()
    bus, consumer, stop, task = await start_jobs(config, names, hub, data, executor, handled, changed)
    await producer.publish(names.jobs_queue, b"\x93garbage")
    await producer.publish(names.jobs_queue, codec.encode(job(1, "poison job")))
    await producer.publish(names.jobs_queue, codec.encode(job(2, "good job")))
    await producer.publish(names.jobs_queue, codec.encode(job(3, "long reply", LONG)))
    assert await collector.wait_for(lambda seen: len(seen) == 3, TIMEOUT_S)
    results = {i: collector.seen[job_id(batch, i)] for i in range(3)}
    assert results[0].status == "failed" and "moved to the dead queue: delivery limit 3 reached" in results[0].error
    assert results[1].status == "failed" and "internal error at attempt 3 of 3" in results[1].error
    assert executor.calls == config.delivery_limit
    assert results[2].status == "completed"
    await until(lambda: job_id(batch, 3) in handled, [changed])
    stored = await data.result(batch, job_id(batch, 3))  # its reply could not go out; its result is kept
    assert stored is not None and codec.decode(stored, JobResult).status == "completed"
    dead = await dead_letters(producer, names, 2)
    reasons = sorted(d.headers["x-exegpt-reason"] for d in dead)
    assert reasons[0] == "delivery limit 3 reached" and reasons[1].startswith("undecodable: ")
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, TIMEOUT_S)
    await collector.stop()
    for b in (bus, producer):
        await b.close()


# --- exegpt dlq --------------------------------------------------------------------------------------


async def test_dlq_lists_replays_and_purges(config, hub):
    names = Names(config.namespace)
    bus = await open_bus(config, names, hub)
    await bus.declare_queue(names.encode_queue)
    sub = await bus.consume(names.encode_queue, prefetch=10)
    bodies = [codec.encode(EncodeWork(f"r-{i}", FAKE, (104,), Sampling(3), "nobody", 0.0)) for i in range(2)]
    for i, body in enumerate([*bodies, b"\x93garbage"]):
        await bus.publish(names.encode_queue, body, headers={"traceparent": f"t{i}"})
        await (await next_of(sub)).dead_letter(f"test reason {i}")
    await sub.cancel()

    lines = await act(bus, names, "list", None)
    assert lines[0].split()[:5] == ["ID", "QUEUE", "ATTEMPTS", "REQUEST", "AGE"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[1], r[2], r[3]) for r in rows] == [
        (names.encode_queue, "1", "r-0"),
        (names.encode_queue, "1", "r-1"),
        (names.encode_queue, "1", "-"),
    ]
    assert [" ".join(r[5:]) for r in rows] == ["test reason 0", "test reason 1", "test reason 2"]
    assert await bus.queue_depth(names.dead_queue) == 3  # listing keeps them
    ids = [r[0] for r in rows]

    lines = await act(bus, names, "replay", {ids[1], "nonesuch"})
    assert lines == [
        f"replayed {ids[1]} to {names.encode_queue} (r-1)",
        "no dead message nonesuch",
        "replayed 1 of 3 dead messages",
    ]
    sub = await bus.consume(names.encode_queue, prefetch=10)
    replayed = await next_of(sub)
    assert replayed.body == bodies[1] and replayed.attempts == 1 and dict(replayed.headers) == {"traceparent": "t1"}
    await replayed.ack()
    await sub.cancel()
    assert [line.split()[3] for line in (await act(bus, names, "list", None))[1:]] == ["r-0", "-"]

    assert await act(bus, names, "purge", None) == [f"purged 2 dead messages from {names.dead_queue}"]
    assert await act(bus, names, "list", None) == ["the dead queue is empty"]
    await bus.close()


@pytest.mark.parametrize("transport_kind", [pytest.param("broker", marks=pytest.mark.broker)])
async def test_the_dlq_command(config, hub, capsys, transport_kind):
    from services.cli import main

    names = Names(config.namespace)
    bus = await open_bus(config, names, hub)
    await bus.declare_queue(names.encode_queue)
    await bus.publish(names.encode_queue, codec.encode(EncodeWork("r-cli", FAKE, (104,), Sampling(3), "nobody", 0.0)))
    await (await next_of(await bus.consume(names.encode_queue, prefetch=1))).dead_letter("undecodable: test")
    await bus.close()
    urls = ["--namespace", names.namespace, "--amqp-url", config.amqp_url, "--redis-url", config.redis_url]
    assert await asyncio.to_thread(main, ["dlq", "list", *urls]) == 0
    out = capsys.readouterr().out
    assert "r-cli" in out and "undecodable: test" in out and names.encode_queue in out
    assert await asyncio.to_thread(main, ["dlq", "replay", "--all", *urls]) == 0
    assert "replayed 1 of 1 dead messages" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["dlq", "purge", *urls]) == 0
    assert "purged 0 dead messages" in capsys.readouterr().out
