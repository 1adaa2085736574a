"""500 jobs through an in-process mesh on tiny-llama (a scheduler and two workers), on the
in-memory transport and on RabbitMQ/Redis; one of two job consumers is killed halfway."""

import asyncio

import pytest

from common.config import MeshConfig
from common.jobs import JobProducer, ReplyCollector, job_id, new_batch_id
from common.messages.jobs import BatchJob
from common.messages.work import Sampling
from common.transport.connect import open_transports
from services.batch.consumer import ConsumerConfig, JobConsumer
from services.batch.mesh_executor import MeshExecutor
from services.front.core import Gateway
from services.gateway import ServedModel
from services.hosting.engines import EngineRunner, load_engine
from services.run.embedded import local_workers

pytestmark = pytest.mark.slow
MODEL = "tiny-llama"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def engines():
    cfg = MeshConfig(model=MODEL, threads=1, device="cpu")
    return load_engine(cfg), load_engine(cfg)


async def start_consumer(env, config, model, name):
    gateway = Gateway(config, await open_transports(config, env.names, env.hub), MODEL)
    await gateway.start()
    executor = MeshExecutor(gateway, model, timeout_s=TIMEOUT_S)
    consumer = JobConsumer(
        gateway.bus, env.data, env.names, executor, ConsumerConfig(name, max_inflight=16, drain_timeout_s=5)
    )
    stop = asyncio.Event()
    return consumer, gateway, stop, asyncio.create_task(consumer.run(stop))


async def test_500_jobs_through_the_mesh_with_a_consumer_killed(env, engines):
    config = env.config.model_copy(update={"model": MODEL, "threads": 1, "device": "cpu"})
    model = ServedModel(MODEL, engines[0].tokenizer, engines[0].max_context)
    runners = [EngineRunner(e) for e in engines]
    async with local_workers(config, env.hub, runners=runners):
        producer = JobProducer(await env.bus(), env.data, env.names)
        batch, reply = new_batch_id(), env.names.reply_queue("test")
        jobs = [
            BatchJob(
                job_id(batch, i),
                MODEL,
                "completion",
                f"job number {i}",
                (),
                Sampling(3, ignore_eos=True),
                reply,
                batch,
                0.0,
            )
            for i in range(500)
        ]
        doomed, doomed_gw, _, doomed_task = await start_consumer(env, config, model, "doomed")
        survivor, survivor_gw, stop, task = await start_consumer(env, config, model, "survivor")
        await producer.submit(batch, jobs, reply_to=reply)
        collector = await ReplyCollector(producer.bus, reply).start()
        assert await collector.wait_for(lambda seen: len(seen) >= 250, TIMEOUT_S)
        doomed_task.cancel()  # the consumer dies mid-batch: its connection goes, unacked jobs return
        await asyncio.gather(doomed_task, return_exceptions=True)
        await doomed_gw.close()
        finished = await collector.wait_for(lambda seen: len(seen) == 500, TIMEOUT_S)
        await collector.stop()
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
        await survivor_gw.close()
        results = await producer.results(batch)
    for runner in runners:
        runner.close()
    assert finished and len(collector.seen) == 500
    assert collector.duplicates <= 16  # replies are at least once; only the dead one's jobs
    assert all(r is not None and r.status == "completed" and r.completion_tokens == 3 for r in results)
    assert doomed.stats.stored + survivor.stats.stored == 500  # each result stored exactly once
    # (Whether the killed consumer still held unfinished jobs at that instant depends on timing: on
    # RabbitMQ it sometimes holds none, so the test does not require a redelivery, only that every
    # job completed once whatever the kill interrupted.)


async def test_an_interactive_request_does_not_wait_for_the_batch(env, engines):
    """With 300 batch jobs queued, a request submitted through the gateway finishes while most of
    the batch is still waiting: the batch consumer keeps only a few jobs in the mesh at a time and
    starts none while interactive work is queued."""
    from services.batch.consumer import QueueDepthAdmission

    config = env.config.model_copy(update={"model": MODEL, "threads": 1, "device": "cpu"})
    model = ServedModel(MODEL, engines[0].tokenizer, engines[0].max_context)
    runners = [EngineRunner(e) for e in engines]
    async with local_workers(config, env.hub, runners=runners):
        producer = JobProducer(await env.bus(), env.data, env.names)
        batch, reply = new_batch_id(), env.names.reply_queue("test")
        jobs = [
            BatchJob(
                job_id(batch, i),
                MODEL,
                "completion",
                f"batch job {i}",
                (),
                Sampling(8, ignore_eos=True),
                reply,
                batch,
                0.0,
            )
            for i in range(300)
        ]
        gateway = Gateway(config, await open_transports(config, env.names, env.hub), MODEL)
        await gateway.start()
        executor = MeshExecutor(gateway, model, timeout_s=TIMEOUT_S)
        admission = QueueDepthAdmission(
            gateway.bus, env.names.encode_queue, max_depth=0, poll_s=0.01, own_waiting=executor.waiting
        )
        consumer = JobConsumer(
            gateway.bus, env.data, env.names, executor, ConsumerConfig("batch", max_inflight=4), admission
        )
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        await producer.submit(batch, jobs, reply_to=reply)
        collector = await ReplyCollector(producer.bus, reply).start()
        assert await collector.wait_for(lambda seen: len(seen) >= 10, TIMEOUT_S)
        interactive = Gateway(config, await open_transports(config, env.names, env.hub), MODEL)
        await interactive.start()
        pending = await interactive.submit(
            model.tokenizer.encode("interactive"), Sampling(8, ignore_eos=True), timeout_s=TIMEOUT_S
        )
        tokens = [t async for t in pending.tokens()]
        batch_done_then = len(collector.seen)
        assert await collector.wait_for(lambda seen: len(seen) == 300, TIMEOUT_S)
        await collector.stop()
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
        await interactive.close()
        await gateway.close()
    for runner in runners:
        runner.close()
    assert len(tokens) == 8
    assert batch_done_then < 150, f"the interactive request waited for {batch_done_then} batch jobs"
