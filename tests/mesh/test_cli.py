"""The commands as a user runs them: `serve` (embedded) and `up` (separate processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from common.config import MeshConfig
from common.transport.connect import LocalHub
from services.cli import main
from tests.brokers import AMQP_URL, REDIS_URL, require_broker
from tests.mesh.conftest import purge_namespace
from tests.mesh.processes import ProcessMesh

TIMEOUT_S = 60


def completion(n: int) -> dict:
    return {"model": "tiny-llama", "prompt": "hi there", "max_tokens": n, "temperature": 0, "ignore_eos": True}


@pytest.mark.slow
async def test_serve_runs_everything_in_one_process():
    mesh = ProcessMesh({"EXEGPT_THREADS": "1", "EXEGPT_DEVICE": "cpu"})
    try:
        proc = mesh.start("serve", "--model", "tiny-llama", "--port", "0")
        url = proc.wait_line("ready gateway").split()[-1]
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as client:
            body = (await client.post("/v1/completions", json=completion(5))).json()
        assert body["usage"]["completion_tokens"] == 5
        await the_openai_client_works(url)
        assert mesh.stop(proc) == 0  # SIGTERM: drained and closed cleanly
    finally:
        mesh.close()


def test_serve_on_a_taken_port_says_so_in_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["serve", "--model", "tiny-llama", "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err == f"exegpt serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"


async def the_openai_client_works(url: str) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S)
    try:
        out = await client.completions.create(
            model="tiny-llama", prompt="hi", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
        stream = await client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage.completion_tokens == 4
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny-llama"]
    finally:
        await client.close()


@pytest.mark.broker
@pytest.mark.slow
async def test_up_restarts_a_dead_child_and_stops_the_mesh_on_sigterm():
    require_broker()
    namespace = f"u{uuid.uuid4().hex[:10]}"
    mesh = ProcessMesh({"EXEGPT_THREADS": "1", "EXEGPT_DEVICE": "cpu"})
    try:
        up = mesh.start(
            "up",
            "--model",
            "tiny-llama",
            "--port",
            "0",
            "--namespace",
            namespace,
            "--amqp-url",
            AMQP_URL,
            "--redis-url",
            REDIS_URL,
            "--workers",
            "2",
        )
        url = up.wait_line("ready mesh").split()[-1]
        children = [ln for ln in up.output if ln.startswith("[") and "] ready " in ln]
        assert len(children) == 4  # scheduler, 2 workers, gateway
        worker_pid = int(next(ln for ln in children if ln.startswith("[worker-1]")).split("-")[-2])
        os.kill(worker_pid, signal.SIGKILL)
        up.wait_line("[worker-1] ready worker")  # supervised: started again
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as client:
            responses = await asyncio.gather(*(client.post("/v1/completions", json=completion(4)) for _ in range(8)))
        assert [r.json()["usage"]["completion_tokens"] for r in responses] == [4] * 8
        assert mesh.stop(up) == 0
    finally:
        mesh.close()
        config = MeshConfig(namespace=namespace, amqp_url=AMQP_URL, redis_url=REDIS_URL)
        await purge_namespace(config, LocalHub())


def test_worker_roles_refuse_to_run_without_a_broker(capsys, monkeypatch):
    for name in list(os.environ):
        if name.startswith("EXEGPT_"):
            monkeypatch.delenv(name)
    assert main(["worker", "--model", "tiny-llama"]) == 2
    assert "--amqp-url" in capsys.readouterr().err


def test_a_bad_setting_is_one_line_error(capsys):
    assert main(["serve", "--namespace", "bad name!"]) == 2
    assert "namespace" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, value, says",
    [("EXEGPT_PROFILE", "/no/such/profile.jsonl", "cannot read"), ("EXEGPT_PRIOR", "X", "neither a task")],
)
def test_what_the_scheduler_plans_on_is_checked_before_it_starts(capsys, monkeypatch, setting, value, says):
    monkeypatch.setenv(setting, value)
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "scheduler planning" in err and says in err and "Traceback" not in err


def test_a_command_whose_reader_went_away_exits_quietly():
    """`exegpt … | head`: every command stops with the SIGPIPE status, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "services.cli", "keys", "new", "--owner", "alice"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


@pytest.mark.broker
def test_down_deletes_the_namespace_queues_exchanges_and_keys(capsys):
    """What `exegpt up` leaves behind on the real broker and Redis is gone after `exegpt down`;
    another namespace's keys stay."""
    import aio_pika
    import redis.asyncio as aioredis

    from common.names import Names
    from common.transport.connect import open_transports

    require_broker()
    names, other = Names(f"down-{uuid.uuid4().hex[:8]}"), Names(f"down-{uuid.uuid4().hex[:8]}")
    config = MeshConfig(namespace=names.namespace, amqp_url=AMQP_URL, redis_url=REDIS_URL)
    queues = [names.encode_queue, names.handoff_queue, names.scheduler_queue, names.dead_queue, names.jobs_queue]
    exchanges = [names.control_exchange, names.abort_exchange, names.status_exchange, names.dead_exchange]

    async def leave_things_behind() -> None:
        t = await open_transports(config, names, LocalHub())
        for queue in queues:
            if queue != names.dead_queue:  # connecting declared it, with the dead-letter exchange
                await t.bus.declare_queue(queue)
        await t.bus.publish(names.encode_queue, b"queued work")
        for exchange in exchanges:
            await t.bus.declare_fanout(exchange)
        await t.store.set(names.key_prefix + "schedule", b"v1")
        await t.store.set(other.key_prefix + "schedule", b"v1")
        await t.close()

    async def left() -> tuple[list[str], int, bool]:
        connection = await aio_pika.connect(AMQP_URL)
        found = []
        try:
            for name, passive in [(q, "queue") for q in queues] + [(e, "exchange") for e in exchanges]:
                channel = await connection.channel()
                try:
                    if passive == "queue":
                        await channel.declare_queue(name, passive=True)
                    else:
                        await channel.get_exchange(name, ensure=True)
                    found.append(name)
                except aio_pika.exceptions.ChannelClosed:
                    pass
        finally:
            await connection.close()
        redis = aioredis.from_url(REDIS_URL)
        try:
            keys = len([k async for k in redis.scan_iter(match=names.key_prefix + "*")])
            other_kept = await redis.exists(other.key_prefix + "schedule") == 1
        finally:
            await redis.aclose()
        return found, keys, other_kept

    asyncio.run(leave_things_behind())
    before, keys_before, _ = asyncio.run(left())
    assert sorted(before) == sorted(queues + exchanges) and keys_before == 1
    assert main(["down", "--namespace", names.namespace, "--amqp-url", AMQP_URL, "--redis-url", REDIS_URL]) == 0
    assert names.namespace in capsys.readouterr().out
    after, keys_after, other_kept = asyncio.run(left())
    asyncio.run(
        purge_namespace(MeshConfig(namespace=other.namespace, amqp_url=AMQP_URL, redis_url=REDIS_URL), LocalHub())
    )
    assert after == [] and keys_after == 0 and other_kept


def test_down_needs_the_broker_and_redis(capsys, monkeypatch):
    for var in ("EXEGPT_AMQP_URL", "EXEGPT_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    assert main(["down", "--namespace", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--amqp-url and --redis-url" in err and len(err.splitlines()) == 1


def test_service_roles_log_the_products_info_lines_and_only_warnings_of_libraries():
    import logging

    from services.cli.serve import configure_logging

    root_before = logging.getLogger().level
    try:
        configure_logging()
        assert logging.getLogger("services.gateway.app").isEnabledFor(logging.INFO)
        assert not logging.getLogger("aio_pika").isEnabledFor(logging.INFO)
    finally:
        logging.getLogger().setLevel(root_before)
        for name in ("services", "engine", "common"):
            logging.getLogger(name).setLevel(logging.NOTSET)
