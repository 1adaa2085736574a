"""The commands as a user runs them: `serve` (embedded) and `up` (separate processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid

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
    return {"model": "tiny-llama", "prompt": "hi there", "max_tokens": n, "temperature": 0,
            "ignore_eos": True}


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
        out = await client.completions.create(model="tiny-llama", prompt="hi", max_tokens=6,
                                              temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
        stream = await client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
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
        up = mesh.start("up", "--model", "tiny-llama", "--port", "0", "--namespace", namespace,
                        "--amqp-url", AMQP_URL, "--redis-url", REDIS_URL,
                        "--workers", "2")
        url = up.wait_line("ready mesh").split()[-1]
        children = [ln for ln in up.output if ln.startswith("[") and "] ready " in ln]
        assert len(children) == 4  # scheduler, 2 workers, gateway
        worker_pid = int(next(ln for ln in children if ln.startswith("[worker-1]")).split("-")[-2])
        os.kill(worker_pid, signal.SIGKILL)
        up.wait_line("[worker-1] ready worker")  # supervised: started again
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as client:
            responses = await asyncio.gather(*(client.post("/v1/completions", json=completion(4))
                                               for _ in range(8)))
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




@pytest.mark.parametrize("setting, value, says", [("EXEGPT_PROFILE", "/no/such/profile.jsonl", "cannot read"),
                                                  ("EXEGPT_PRIOR", "X", "neither a task")])
def test_what_the_scheduler_plans_on_is_checked_before_it_starts(capsys, monkeypatch, setting, value, says):
    monkeypatch.setenv(setting, value)
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "scheduler planning" in err and says in err and "Traceback" not in err
