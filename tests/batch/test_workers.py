"""Job consumers as separate processes on the real RabbitMQ and Redis; one is killed halfway."""

import ast
import asyncio
import signal
import sys
from pathlib import Path

import pytest

from common.jobs import JobProducer, ReplyCollector, job_id, new_batch_id
from common.messages.jobs import BatchJob
from common.messages.work import Sampling
from tests.brokers import require_broker

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.broker


@pytest.fixture
def transport_kind() -> str:
    """Only the real broker: worker processes cannot share an in-memory queue."""
    require_broker()
    return "broker"


def survivor_stats(log: str) -> dict:
    """The consumer stats a worker prints when it stops: ``...: stopped; {...}``."""
    line = next((x for x in log.splitlines() if ": stopped; " in x), None)
    assert line is not None, f"the worker printed no stats when it stopped; its output:\n{log[-3000:]}"
    return ast.literal_eval(line.split(": stopped; ", 1)[1])


async def start_worker(env, name, *extra):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "batch",
        "worker",
        "--worker-id",
        name,
        "--amqp-url",
        env.config.amqp_url,
        "--redis-url",
        env.config.redis_url,
        "--namespace",
        env.config.namespace,
        *extra,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    line = await asyncio.wait_for(proc.stdout.readline(), 60)  # "...: consuming <queue>"
    assert b"consuming" in line, line
    return proc


async def stop_worker(proc, sig=signal.SIGTERM):
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return out.decode() + "\n(killed: still running 30 s after the signal)\n"
    return out.decode()


def jobs_for(batch, count, reply, max_tokens=2):
    return [
        BatchJob(
            job_id(batch, i),
            "tiny-llama",
            "completion",
            f"one two three four {i}",
            (),
            Sampling(max_tokens, ignore_eos=True),
            reply,
            batch,
            0.0,
        )
        for i in range(count)
    ]


async def run_with_a_kill(env, worker_args, count, timeout_s):
    """Two workers; SIGKILL the first once half the replies are in; wait for the rest."""
    producer = JobProducer(await env.bus(), env.data, env.names)
    batch = new_batch_id()
    reply = env.names.reply_queue("test")
    jobs = jobs_for(batch, count, reply)
    expected = {j.job_id for j in jobs}
    workers = [await start_worker(env, f"w{i}", *worker_args) for i in range(2)]
    try:
        await producer.submit(batch, jobs, reply_to=reply)
        collector = await ReplyCollector(producer.bus, reply).start()
        assert await collector.wait_for(lambda seen: len(seen) >= count // 2, timeout_s)
        workers[0].kill()  # SIGKILL: no drain, its unacked jobs return to the queue
        await workers[0].wait()
        await collector.wait_for(lambda seen: expected <= seen.keys(), timeout_s)
        await collector.stop()
    finally:
        logs = [await stop_worker(w) for w in workers]
    results = await producer.results(batch)
    return collector, results, logs


async def test_500_jobs_with_a_worker_killed_halfway(env):
    collector, results, logs = await run_with_a_kill(
        env, ["--executor", "echo", "--echo-delay-ms", "20", "--max-inflight", "8"], 500, 60
    )
    assert len(collector.seen) == 500, logs
    # replies are at least once: only jobs the killed worker held can be replied twice
    assert collector.duplicates <= 8
    assert all(r is not None and r.status == "completed" for r in results)
    assert len({r.job_id for r in results}) == 500
    # the killed worker's unacked jobs went to the survivor: it either ran them (a redelivered
    # result) or found their results already stored (the kill came between store and ack)
    survivor = survivor_stats(logs[1])  # also: the survivor drained and stopped on SIGTERM
    moved = sum(1 for r in results if r.redelivered and r.worker == "w1") + survivor["duplicates"]
    assert moved > 0, "no job moved to the survivor"
    assert survivor["stored"] + sum(1 for r in results if r.worker == "w0") == 500


@pytest.mark.slow
async def test_500_jobs_through_the_mesh_processes_with_a_worker_killed(env):
    """Scheduler and two worker processes on tiny-llama; two batch consumers submit through the
    mesh; one is killed halfway."""
    from tests.mesh.processes import ProcessMesh

    config = env.config.model_copy(update={"model": "tiny-llama", "threads": 1, "device": "cpu", "drain_timeout_s": 10})
    mesh = ProcessMesh({f"EXEGPT_{k.upper()}": str(v) for k, v in config.model_dump().items() if v is not None})
    try:
        mesh.start("scheduler").wait_line("ready")
        workers = [mesh.start("worker") for _ in range(2)]
        for w in workers:
            w.wait_line("ready")
        collector, results, logs = await run_with_a_kill(
            env, ["--executor", "mesh", "--model", "tiny-llama", "--max-inflight", "32"], 500, 120
        )
    finally:
        mesh.close()
        names = env.names
        bus = await env.bus()
        await bus.delete(
            queues=[names.encode_queue, names.handoff_queue], exchanges=[names.control_exchange, names.status_exchange]
        )
    assert len(collector.seen) == 500, logs
    assert collector.duplicates <= 32
    assert all(r is not None and r.status == "completed" for r in results), {
        r.error for r in results if r is not None and r.status != "completed"
    }
    assert all(r.completion_tokens == 2 for r in results)  # forced length, ignore_eos
    assert len({r.job_id for r in results}) == 500
    survivor = survivor_stats(logs[1])
    assert sum(1 for r in results if r.redelivered and r.worker == "w1") + survivor["duplicates"] > 0


async def test_loadgen_batch_target_times_a_batch(env, tmp_path):
    import json

    worker = await start_worker(env, "w", "--executor", "echo", "--max-inflight", "32")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli",
            "loadgen",
            "--target",
            "batch",
            "--amqp-url",
            env.config.amqp_url,
            "--redis-url",
            env.config.redis_url,
            "--namespace",
            env.config.namespace,
            "--task",
            "S",
            "--num-requests",
            "200",
            "--model",
            "tiny-llama",
            "--max-duration-s",
            "60",
            "--out",
            str(tmp_path / "b.json"),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        await stop_worker(worker)
    assert proc.returncode == 0, out.decode()
    batch = json.loads((tmp_path / "b.json").read_text())["batch"]
    assert batch["jobs"] == batch["completed"] == 200 and batch["missing"] == 0
    assert batch["jobs_per_s"] > 0 and batch["wall_s"] > 0


async def run_cli(env, *args, timeout_s=60):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "batch",
        *args,
        "--amqp-url",
        env.config.amqp_url,
        "--redis-url",
        env.config.redis_url,
        "--namespace",
        env.config.namespace,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    return proc.returncode, out.decode(), err.decode()


async def test_batch_cli_submit_status_results_cancel(env, tmp_path):
    import json

    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        '{"prompt": "one two three", "max_tokens": 2}\n'
        '{"messages": [{"role": "user", "content": "four five"}], "max_tokens": 1}\n'
    )
    worker = await start_worker(env, "w", "--executor", "echo")
    try:
        rc, out, err = await run_cli(env, "submit", str(requests), "--model", "m", "--wait")
        assert rc == 0, err
        batch_id, status_line = out.splitlines()[:2]
        assert json.loads(status_line)["completed"] == 2
        rc, out, _ = await run_cli(env, "status", batch_id)
        assert rc == 0 and json.loads(out)["done"] is True
        rc, out, _ = await run_cli(env, "results", batch_id)
        texts = [json.loads(line)["text"] for line in out.splitlines()]
        assert rc == 0 and texts == [" one two", " four"]
    finally:
        await stop_worker(worker)
    rc, _, err = await run_cli(env, "cancel", "b-no-such-batch")
    assert rc == 2 and "no batch" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "max_tokens": -1}\n')
    rc, _, err = await run_cli(env, "submit", str(bad), "--model", "m")
    assert rc == 2 and "bad.jsonl:1" in err and "max_tokens" in err


@pytest.mark.slow
async def test_a_local_consumer_runs_jobs_through_its_own_worker(env):
    """--executor local: the consumer process starts a worker and a scheduler of its own (the
    mesh's worker code over the in-memory bus) and its jobs run there, with the model's text."""
    from engine import load_engine
    from engine.api import GenerationRequest, SamplingParams

    producer = JobProducer(await env.bus(), env.data, env.names)
    batch, reply = new_batch_id(), env.names.reply_queue("local")
    jobs = jobs_for(batch, 12, reply, max_tokens=5)
    worker = await start_worker(env, "local", "--executor", "local", "--model", "tiny-llama", "--max-batch", "4")
    try:
        await producer.submit(batch, jobs, reply_to=reply)
        collector = await ReplyCollector(producer.bus, reply).start()
        assert await collector.wait_for(lambda seen: len(seen) >= 12, 120)
        await collector.stop()
    finally:
        log = await stop_worker(worker)
    results = await producer.results(batch)
    engine = load_engine("tiny-llama", device="cpu")
    for job, result in zip(jobs, results):
        ids = tuple(engine.tokenizer.encode(job.prompt))
        events = engine.prefill([GenerationRequest("solo", ids, SamplingParams(5, ignore_eos=True))])
        while engine.running():
            events += engine.decode_step()
        assert result.status == "completed" and result.text == "".join(e.text for e in events), log
