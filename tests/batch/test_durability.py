"""Batch files, batches and results survive a Redis restart (Redis with an append-only file), and
the gateway warns at start when its Redis persists nothing."""

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from tests.brokers import need
import redis
from redis import asyncio as aioredis

from common.config import MeshConfig
from common.names import Names
from common.transport.connect import LocalHub
from services.batch.api import batch_lifespan, batch_router
from common.transport.durability import persistence_risk, warn_if_not_durable
from services.gateway import ServedModel, create_app
from tests.batch.conftest import run_jobs

MODEL = "tiny-llama"
START_TIMEOUT_S = 30

@pytest.fixture(autouse=True)
def _redis_server_installed() -> None:
    need(shutil.which("redis-server") is not None, "no redis-server (deploy/ensure-services.sh installs it)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
             "--save", "", "--protected-mode", "yes", "--logfile", str(self.data_dir / "redis.log"),
             *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
def aof_redis(tmp_path):
    server = OwnRedis(tmp_path, "--appendonly", "yes", "--appendfsync", "everysec")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def gateway(config):
    app = create_app(config, ServedModel(MODEL, None, 2048), hub=LocalHub(), routers=(batch_router(),),
                     lifespans=(batch_lifespan(run_consumer=False),))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app



async def test_batch_data_survives_a_redis_restart(aof_redis, caplog):
    # Redis holds files, batches and results; the jobs queue may stay in memory here
    config = MeshConfig(namespace="durable", model=MODEL, redis_url=aof_redis.url)
    lines = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": MODEL, "prompt": f"line {i} says hello", "max_tokens": 3}})
                    + "\n" for i in range(4)) + "{broken\n"
    with caplog.at_level(logging.WARNING, logger="common.transport.durability"):
        async with gateway(config) as (client, app):
            file = (await client.post("/v1/files", data={"purpose": "batch"},
                                      files={"file": ("in.jsonl", lines.encode(), "application/jsonl")})).json()
            batch = (await client.post("/v1/batches", json={"input_file_id": file["id"],
                                                            "endpoint": "/v1/completions"})).json()
            await run_jobs(app, 4, START_TIMEOUT_S)
            before = {
                "file": (await client.get(f"/v1/files/{file['id']}")).json(),
                "input": (await client.get(f"/v1/files/{file['id']}/content")).text,
                "batch": (await client.get(f"/v1/batches/{batch['id']}")).json(),
                "list": (await client.get("/v1/batches")).json(),
            }
            finished = before["batch"]
            before["output"] = (await client.get(f"/v1/files/{finished['output_file_id']}/content")).text
            before["errors"] = (await client.get(f"/v1/files/{finished['error_file_id']}/content")).text
    assert not [r for r in caplog.records if r.name == "common.transport.durability"]  # AOF: no warning
    assert finished["status"] == "completed" and finished["request_counts"]["completed"] == 4
    assert before["input"] == lines and len(before["output"].splitlines()) == 4

    aof_redis.shutdown()
    aof_redis.start()  # same port, same directory: it replays the append-only file

    async with gateway(config) as (client, _):
        after = {
            "file": (await client.get(f"/v1/files/{file['id']}")).json(),
            "input": (await client.get(f"/v1/files/{file['id']}/content")).text,
            "batch": (await client.get(f"/v1/batches/{batch['id']}")).json(),
            "list": (await client.get("/v1/batches")).json(),
            "output": (await client.get(f"/v1/files/{finished['output_file_id']}/content")).text,
            "errors": (await client.get(f"/v1/files/{finished['error_file_id']}/content")).text,
        }
    assert after == before


async def test_the_gateway_warns_when_redis_persists_nothing(tmp_path, caplog):
    server = OwnRedis(tmp_path, "--appendonly", "no")
    server.start()
    try:
        with caplog.at_level(logging.WARNING, logger="common.transport.durability"):
            risk = await warn_if_not_durable(server.url)
        assert risk is not None and "appendonly" in risk
        warnings = [r for r in caplog.records if r.name == "common.transport.durability"]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        # an RDB save point is persistence too (coarser): no warning
        client = aioredis.Redis(port=server.port)
        await client.config_set("save", "3600 1")
        assert await persistence_risk(client) is None
        await client.aclose()
    finally:
        server.stop()


async def test_the_check_tolerates_a_redis_that_forbids_config(tmp_path):
    class Forbidden:
        async def config_get(self, name):
            raise redis.exceptions.ResponseError("unknown command 'CONFIG'")

    assert await persistence_risk(Forbidden()) is None
    server = OwnRedis(tmp_path, "--appendonly", "no", "--rename-command", "CONFIG", "")
    server.start()
    try:
        assert await warn_if_not_durable(server.url) is None
    finally:
        server.stop()
    assert await warn_if_not_durable(f"redis://127.0.0.1:{free_port()}/0") is None  # nobody there
