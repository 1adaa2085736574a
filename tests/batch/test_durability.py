"""Batch files, batches and results survive the store losing everything (they live in the batch
folder; Redis, a server of the test's own, keeps only an index, rebuilt), and a batch whose record
was lost says so."""

import asyncio
import contextlib
import json
import shutil
import subprocess
import time

import httpx
import pytest
import redis
from redis import asyncio as aioredis

from common.config import MeshConfig
from common.jobs import job_id
from common.messages import codec
from common.messages.jobs import JobResult
from common.names import Names
from common.transport.batchdir import BatchDir
from common.transport.connect import LocalHub, open_store
from engine.parallel.procs import free_port
from services.batch.api import batch_lifespan, batch_router
from services.batch.consumer import ConsumerConfig, JobConsumer
from services.batch.executor import EchoExecutor
from services.batch.openai_batch import BatchApiError, Caller
from services.gateway import ServedModel, create_app
from tests.batch.conftest import run_jobs
from tests.brokers import need

MODEL = "tiny-llama"
START_TIMEOUT_S = 30


@pytest.fixture(autouse=True)
def _redis_server_installed() -> None:
    need(shutil.which("redis-server") is not None, "no redis-server (deploy/ensure-services.sh installs it)")


class OwnRedis:
    """A redis-server of this test: loopback, a free port, its data in ``data_dir``."""

    def __init__(self, data_dir, *args: str) -> None:
        self.data_dir, self.args, self.port = data_dir, args, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--protected-mode",
                "yes",
                "--logfile",
                str(self.data_dir / "redis.log"),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:  # until it answers (the AOF is loaded before it does), with a deadline
                assert self.proc.poll() is None, (self.data_dir / "redis.log").read_text()
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:  # not listening yet / still loading
                    pass
                assert time.monotonic() < deadline, "redis-server did not answer in time"
                time.sleep(0.05)  # a poll interval, bounded by the deadline
        finally:
            client.close()

    def shutdown(self) -> None:
        """SHUTDOWN (no RDB: the test server has no save points), and wait for the exit."""
        client = redis.Redis(port=self.port, socket_timeout=START_TIMEOUT_S)
        with contextlib.suppress(redis.exceptions.ConnectionError):
            client.shutdown()
        client.close()
        self.proc.wait(timeout=START_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path, "--appendonly", "no")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def gateway(config):
    app = create_app(
        config,
        ServedModel(MODEL, None, 2048),
        hub=LocalHub(),
        routers=(batch_router(),),
        lifespans=(batch_lifespan(run_consumer=False),),
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app


def batch_lines(count: int, tag: str = "c") -> bytes:
    return (
        "".join(
            json.dumps(
                {
                    "custom_id": f"{tag}{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": MODEL, "prompt": f"line {i} says hello", "max_tokens": 3},
                }
            )
            + "\n"
            for i in range(count)
        )
        + "{broken\n"
    ).encode()


async def create_batch(client, count: int, tag: str = "c") -> tuple[dict, dict]:
    file = (
        await client.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", batch_lines(count, tag), "application/jsonl")},
        )
    ).json()
    batch = (await client.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/completions"})).json()
    return file, batch


async def view(client, file: dict, batch_id: str) -> dict:
    """Everything a client reads of a batch and its files, and the listing."""
    batch = (await client.get(f"/v1/batches/{batch_id}")).json()
    out = {
        "file": (await client.get(f"/v1/files/{file['id']}")).json(),
        "input": (await client.get(f"/v1/files/{file['id']}/content")).text,
        "batch": batch,
        "list": (await client.get("/v1/batches")).json(),
    }
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key):
            out[key] = (await client.get(f"/v1/files/{batch[key]}/content")).text
    return out


class HalfwayExecutor(EchoExecutor):
    """Echoes ``free`` jobs, then holds every further one until ``gate`` opens."""

    def __init__(self, free: int) -> None:
        super().__init__()
        self.free, self.started = free, 0
        self.gate, self.holding = asyncio.Event(), asyncio.Event()

    async def execute(self, job):
        self.started += 1
        if self.started > self.free:
            self.holding.set()
            await self.gate.wait()
        return await super().execute(job)


async def test_batches_survive_the_store_losing_everything(own_redis, batch_dir):
    """FLUSHALL while one batch has finished and another runs: files, records and results are in
    the batch folder, so both answer afterwards, the listing is rebuilt, and the running batch ends
    with each line's result stored once."""
    config = MeshConfig(namespace="flushed", model=MODEL, redis_url=own_redis.url, batch_dir=batch_dir)
    async with gateway(config) as (client, app):
        done_file, done_batch = await create_batch(client, 4, "done")
        await run_jobs(app, 4, START_TIMEOUT_S)
        running_file, running_batch = await create_batch(client, 6, "run")
        executor = HalfwayExecutor(free=3)
        handled, all_handled = [], asyncio.Event()

        def on_handled(result, stored):
            handled.append(stored)
            if len(handled) == 6:
                all_handled.set()

        consumer = JobConsumer(
            app.state.gateway.bus,
            app.state.batches.data,
            Names(config.namespace),
            executor,
            ConsumerConfig("flush"),
            on_handled=on_handled,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        await asyncio.wait_for(executor.holding.wait(), START_TIMEOUT_S)  # three done, three running
        before = await view(client, done_file, done_batch["id"])
        partial = (await client.get(f"/v1/batches/{running_batch['id']}")).json()

        client_redis = aioredis.Redis(port=own_redis.port)
        assert await client_redis.dbsize() > 0
        await client_redis.flushall()
        await client_redis.aclose()

        assert await view(client, done_file, done_batch["id"]) == before
        during = (await client.get(f"/v1/batches/{running_batch['id']}")).json()
        assert during["status"] == "in_progress" and during["request_counts"] == partial["request_counts"]
        executor.gate.set()
        try:
            await asyncio.wait_for(all_handled.wait(), START_TIMEOUT_S)
        finally:
            stop.set()
            await asyncio.wait_for(task, START_TIMEOUT_S)
        finished = await view(client, running_file, running_batch["id"])
    assert before["batch"]["status"] == "completed" and before["batch"]["request_counts"]["completed"] == 4
    assert [b["id"] for b in before["list"]["data"]] == [running_batch["id"], done_batch["id"]]
    assert [b["id"] for b in finished["list"]["data"]] == [running_batch["id"], done_batch["id"]]
    assert finished["batch"]["status"] == "completed"
    assert finished["batch"]["request_counts"] == {"total": 7, "completed": 6, "failed": 1}
    custom_ids = [json.loads(line)["custom_id"] for line in finished["output_file_id"].splitlines()]
    assert custom_ids == [f"run{i}" for i in range(6)]  # each line once, in input order
    assert consumer.stats.stored == 6 and all(handled)  # every result stored once, by this consumer


async def test_a_batch_whose_record_was_lost_says_so(own_redis, batch_dir):
    """A batch the index still names (or whose results are kept) but whose record the folder lost
    answers 410 batch_state_lost, to whom may see it; an id never seen is still a 404."""
    config = MeshConfig(namespace="lost", model=MODEL, redis_url=own_redis.url, batch_dir=batch_dir)
    async with gateway(config) as (client, app):
        _, batch = await create_batch(client, 2)
        await run_jobs(app, 2, START_TIMEOUT_S)
        folder = app.state.batches.data.root / "batches" / batch["id"]
        (folder / "openai.json").unlink()  # a folder not shared, or wiped: the index still has it
        lost = await client.get(f"/v1/batches/{batch['id']}")
        assert lost.status_code == 410, lost.text
        error = lost.json()["error"]
        assert error["code"] == "batch_state_lost" and error["param"] == "batch_id"
        assert "was lost" in error["message"] and "2 job results are kept" in error["message"]
        cancel = await client.post(f"/v1/batches/{batch['id']}/cancel")
        assert cancel.status_code == 410
        assert (await client.get("/v1/batches/batch_0123456789abcdef01234567")).status_code == 404
        assert (await client.get("/v1/batches")).json()["data"] == []  # the listing leaves it out
        # the store lost its data too: only its kept results tell of it (an admin sees that)
        client_redis = aioredis.Redis(port=own_redis.port)
        await client_redis.flushall()
        await client_redis.aclose()
        assert (await client.get(f"/v1/batches/{batch['id']}")).status_code == 404  # owner unknown
        store = app.state.batches
        with pytest.raises(BatchApiError) as raised:
            await store.batch_object(batch["id"], caller=Caller(admin=True))
        assert raised.value.status == 410 and raised.value.code == "batch_state_lost"


async def test_ids_from_requests_never_leave_the_folder(tmp_path):
    data = BatchDir(tmp_path / "batches", "ns")
    (tmp_path / "secret.json").write_text('{"owner": ""}')
    for bad in ("../secret", "..", "a/../../secret", "/etc/passwd", "", ".hidden"):
        assert await data.file_meta(bad) is None and await data.file_content(bad) is None
        assert await data.record(bad, "openai.json") is None and not await data.known(bad)
    with pytest.raises(ValueError):
        await data.put_result("../x", "job", b"1")
    assert await data.put_result("b1", "b1-000000", b"first") is True
    assert await data.put_result("b1", "b1-000000", b"second") is False  # the first stays
    assert await data.result("b1", "b1-000000") == b"first"


async def test_batches_an_earlier_version_kept_in_the_store_move_to_the_folder(own_redis, batch_dir):
    """What an earlier version wrote to the store (files, the Batch API's and the queue's records,
    results) is moved into the batch folder when a gateway starts, and answers as before."""
    config = MeshConfig(namespace="legacy", model=MODEL, redis_url=own_redis.url, batch_dir=batch_dir)
    names, batch_id, created = Names("legacy"), "batch_" + "ab" * 12, "1700000000"
    content = batch_lines(2)  # two requests and a broken line
    store = await open_store(config)
    await store.set_with_hash(
        names.legacy_file_content("file-in"),
        content,
        names.legacy_file_meta_prefix + "file-in",
        {"filename": "in.jsonl", "purpose": "batch", "bytes": str(len(content)), "created_at": created, "owner": ""},
        ttl_s=600,
    )
    for file_id, kind in (("file-out", "output"), ("file-err", "errors")):
        await store.hset(
            names.legacy_file_meta_prefix + file_id,
            {
                "owner": "",
                "batch_id": batch_id,
                "kind": kind,
                "purpose": "batch_output",
                "filename": f"{batch_id}_{kind}.jsonl",
                "created_at": created,
            },
            ttl_s=600,
        )
    invalid = [
        {
            "id": "batch_req_line3",
            "custom_id": None,
            "response": None,
            "error": {"code": "invalid_request", "message": "not JSON", "line": 3},
        }
    ]
    await store.hset(
        names.openai_batch(batch_id),
        {
            "input_file_id": "file-in",
            "endpoint": "/v1/completions",
            "owner": "",
            "completion_window": "24h",
            "created_at": created,
            "metadata": "{}",
            "total": "3",
            "output_file_id": "file-out",
            "error_file_id": "file-err",
            "valid": json.dumps([[1, "c0"], [2, "c1"]]),
            "invalid": json.dumps(invalid),
        },
        ttl_s=600,
    )
    await store.hset(
        names.legacy_job_batch_prefix + batch_id,
        {"count": "2", "model": MODEL, "created_at": created, "reply_to": ""},
        ttl_s=600,
    )
    for i in range(2):
        result = JobResult(
            job_id=job_id(batch_id, i),
            batch_id=batch_id,
            status="completed",
            text=f" text {i}",
            finish_reason="length",
            prompt_tokens=3,
            completion_tokens=3,
            error=None,
            worker="w",
            redelivered=False,
            started_at=1700000001.0,
            finished_at=1700000002.0,
        )
        await store.set(names.legacy_job_result(job_id(batch_id, i)), codec.encode(result), ttl_s=600)
    await store.push_capped(names.openai_batches, batch_id.encode(), max_len=1000)
    try:
        async with gateway(config) as (client, _):
            batch = (await client.get(f"/v1/batches/{batch_id}")).json()
            output = (await client.get("/v1/files/file-out/content")).text
            errors = (await client.get("/v1/files/file-err/content")).text
            listed = [b["id"] for b in (await client.get("/v1/batches")).json()["data"]]
            uploaded = (await client.get("/v1/files/file-in/content")).content
        assert batch["status"] == "completed"
        assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        assert [json.loads(line)["response"]["body"]["choices"][0]["text"] for line in output.splitlines()] == [
            " text 0",
            " text 1",
        ]
        assert [json.loads(line)["error"]["line"] for line in errors.splitlines()] == [3]
        assert listed == [batch_id] and uploaded == content
        assert await store.keys_prefix(names.legacy_job_batch_prefix) == []  # moved, not copied
        assert await store.get(names.legacy_job_result(job_id(batch_id, 0))) is None
        assert await store.hgetall(names.openai_batch(batch_id)) == {"owner": ""}  # the index entry
    finally:
        await store.close()
