"""The native job queue on the in-memory transport and on real RabbitMQ/Redis (same cases)."""

import asyncio

import pytest

from common.jobs import JobProducer, ReplyCollector, collect_replies, job_id, new_batch_id
from common.messages import codec
from common.messages.jobs import BatchJob, JobResult
from common.messages.work import Sampling
from services.batch.consumer import ConsumerConfig, JobConsumer, QueueDepthAdmission
from services.batch.executor import EchoExecutor


def make_jobs(batch_id, count, reply_to, prompt="alpha beta gamma delta", max_tokens=2):
    return [
        BatchJob(
            job_id(batch_id, i),
            "tiny",
            "completion",
            f"{prompt} {i}",
            (),
            Sampling(max_tokens),
            reply_to,
            batch_id,
            0.0,
        )
        for i in range(count)
    ]


class GatedExecutor:
    """Echoes, but after ``free`` jobs every further job waits on a gate that never opens,
    so its consumer holds unacked jobs when it is killed."""

    def __init__(self, free: int):
        self.free, self.started = free, 0
        self.gate = asyncio.Event()

    async def execute(self, job):
        self.started += 1
        if self.started > self.free:
            await self.gate.wait()
        return await EchoExecutor().execute(job)


async def start_consumer(env, executor, worker_id, max_inflight=16, on_handled=None):
    bus = await env.bus()
    consumer = JobConsumer(
        bus,
        env.data,
        env.names,
        executor,
        ConsumerConfig(worker_id, max_inflight=max_inflight, drain_timeout_s=2),
        on_handled=on_handled,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    return consumer, bus, stop, task


async def test_500_jobs_give_500_results_once(env):
    producer = JobProducer(await env.bus(), env.data, env.names)
    batch, reply = new_batch_id(), env.names.reply_queue("test")
    jobs = make_jobs(batch, 500, reply)
    consumers = [await start_consumer(env, EchoExecutor(), f"w{i}") for i in range(2)]
    await producer.submit(batch, jobs, reply_to=reply)
    replies, dup_replies = await collect_replies(producer.bus, reply, {j.job_id for j in jobs}, 60)
    for _, _, stop, task in consumers:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert len(replies) == 500 and dup_replies == 0
    results = await producer.results(batch)
    assert all(r is not None and r.status == "completed" for r in results)
    assert [r.job_id for r in results] == [j.job_id for j in jobs]
    assert results[7].text == " alpha beta" and results[7].completion_tokens == 2
    assert sum(c.stats.stored for c, *_ in consumers) == 500  # each result stored exactly once
    assert sum(c.stats.duplicates for c, *_ in consumers) == 0
    status = await producer.status(batch)
    assert status.done and status.completed == 500


async def test_a_consumer_killed_halfway_loses_no_job_and_duplicates_none(env):
    producer = JobProducer(await env.bus(), env.data, env.names)
    batch, reply = new_batch_id(), env.names.reply_queue("test")
    jobs = make_jobs(batch, 500, reply)
    doomed_exec = GatedExecutor(free=100)
    doomed, doomed_bus, _, doomed_task = await start_consumer(env, doomed_exec, "doomed")
    survivor, _, stop, task = await start_consumer(env, EchoExecutor(), "survivor")
    await producer.submit(batch, jobs, reply_to=reply)
    collector = await ReplyCollector(producer.bus, reply).start()
    assert await collector.wait_for(lambda seen: len(seen) >= 250, 30)
    assert doomed_exec.started > 100  # it holds unacked jobs now
    # kill: the process vanishes (its task dies, its connection drops, unacked jobs go back)
    doomed_task.cancel()
    await asyncio.gather(doomed_task, return_exceptions=True)
    await doomed_bus.close()
    env.buses.remove(doomed_bus)
    await collector.wait_for(lambda seen: len(seen) == 500, 60)
    await collector.stop()
    stop.set()
    await asyncio.wait_for(task, 10)
    # the gated jobs never replied before the kill, so no reply is duplicated
    assert collector.seen.keys() == {j.job_id for j in jobs} and collector.duplicates == 0
    results = await producer.results(batch)
    assert all(r is not None and r.status == "completed" for r in results)
    assert len({r.job_id for r in results}) == 500
    assert doomed.stats.stored + survivor.stats.stored == 500
    assert any(r.redelivered and r.worker == "survivor" for r in results)  # it took the dead one's jobs


async def test_redelivered_job_with_a_stored_result_is_not_run_again(env):
    producer = JobProducer(await env.bus(), env.data, env.names)
    batch, reply = new_batch_id(), env.names.reply_queue("test")
    jobs = make_jobs(batch, 3, reply)
    await producer.submit(batch, jobs, reply_to=reply)
    await producer.submit(batch, jobs, reply_to=reply)  # at-least-once: the same jobs twice
    runs = []

    class Counting(EchoExecutor):
        async def execute(self, job):
            runs.append(job.job_id)
            return await super().execute(job)

    handled, all_six = [], asyncio.Event()

    def on_handled(result, stored):
        handled.append((result.job_id, stored))
        if len(handled) == 6:
            all_six.set()

    consumer, _, stop, task = await start_consumer(env, Counting(), "w", max_inflight=1, on_handled=on_handled)
    replies, dup = await collect_replies(producer.bus, reply, {j.job_id for j in jobs}, 30)
    await asyncio.wait_for(all_six.wait(), 30)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert sorted(runs) == sorted(j.job_id for j in jobs)
    assert consumer.stats.stored == 3 and consumer.stats.duplicates == 3 and dup == 0
    assert sorted(stored for _, stored in handled) == [False] * 3 + [True] * 3


async def test_bad_jobs_fail_and_bad_bytes_go_to_the_dead_queue(env):
    producer = JobProducer(await env.bus(), env.data, env.names)
    batch, reply = new_batch_id(), env.names.reply_queue("test")
    jobs = make_jobs(batch, 2, reply)
    jobs[1] = BatchJob(jobs[1].job_id, "tiny", "completion", "   ", (), Sampling(2), reply, batch, 0)
    consumer, bus, stop, task = await start_consumer(env, EchoExecutor(), "w")
    await bus.declare_queue(env.names.jobs_queue)
    await bus.publish(env.names.jobs_queue, b"\x93not a job")
    await producer.submit(batch, jobs, reply_to=reply)
    replies, _ = await collect_replies(producer.bus, reply, {j.job_id for j in jobs}, 30)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert replies[jobs[0].job_id].status == "completed"
    assert replies[jobs[1].job_id].status == "failed" and "empty" in replies[jobs[1].job_id].error
    assert consumer.stats.dead == 1
    assert await producer.bus.queue_depth(env.names.dead_queue) == 1


async def test_cancelled_batch_jobs_finish_as_cancelled(env):
    producer = JobProducer(await env.bus(), env.data, env.names)
    batch, reply = new_batch_id(), env.names.reply_queue("test")
    jobs = make_jobs(batch, 20, reply)
    await producer.submit(batch, jobs, reply_to=reply)
    await producer.cancel(batch)
    _, _, stop, task = await start_consumer(env, EchoExecutor(), "w")
    replies, _ = await collect_replies(producer.bus, reply, {j.job_id for j in jobs}, 30)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert {r.status for r in replies.values()} == {"cancelled"}
    status = await producer.status(batch)
    assert status.cancel_requested and status.cancelled == 20 and status.done


async def test_batch_work_yields_while_interactive_work_is_queued(env):
    bus = await env.bus()
    await bus.declare_queue(env.names.encode_queue)
    for _ in range(3):
        await bus.publish(env.names.encode_queue, b"interactive")
    admission = QueueDepthAdmission(bus, env.names.encode_queue, max_depth=0, poll_s=0.01, max_wait_s=5.0)
    waiting = asyncio.create_task(admission.wait_turn())
    done, _ = await asyncio.wait({waiting}, timeout=0.2)
    assert not done  # three interactive requests wait: the batch job does not start
    sub = await bus.consume(env.names.encode_queue, prefetch=10)  # encoders take them
    taken = 0
    async for delivery in sub:
        await delivery.ack()
        taken += 1
        if taken == 3:
            break
    await asyncio.wait_for(waiting, 5)  # now it starts
    await sub.cancel()
    capped = QueueDepthAdmission(bus, env.names.encode_queue, max_depth=0, max_wait_s=0.05)
    await bus.publish(env.names.encode_queue, b"interactive")
    await asyncio.wait_for(capped.wait_turn(), 5)  # starvation bound: starts after max_wait_s
    assert capped.waited_s >= 0.05


def test_codec_round_trip_and_refuses_other_tags():
    job = make_jobs("b", 1, None)[0]
    assert codec.decode(codec.encode(job), BatchJob) == job
    with pytest.raises(ValueError):
        codec.decode(codec.encode(job), JobResult)
