"""Workers that are process groups (a model over two processes) in a mesh over the real RabbitMQ
and Redis: every request completes once, and a dead rank costs no request.

The groups are two pipeline stages (``EXEGPT_PP=2``): a pipeline gives bit-for-bit the logits of
one process, so every text can be compared with one process's greedy run."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from common.config import MeshConfig
from common.transport.connect import LocalHub
from tests.brokers import AMQP_URL, REDIS_URL, require_broker
from tests.mesh.conftest import purge_namespace
from tests.mesh.processes import ProcessMesh, stream_completion
from tests.mesh.test_processes import solo_texts

pytestmark = [pytest.mark.broker, pytest.mark.slow]
MODEL = "tiny-llama"
TIMEOUT_S = 180
LONG = 200


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def body(prompt: str, n: int, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}


async def test_a_mesh_of_worker_groups_serves_each_request_once_and_survives_a_dead_rank():
    require_broker()
    namespace = f"g{uuid.uuid4().hex[:10]}"
    mesh = ProcessMesh(
        {
            "EXEGPT_THREADS": "1",
            "EXEGPT_DEVICE": "cpu",
            "EXEGPT_PP": "2",
            "EXEGPT_HEARTBEAT_S": "0.5",
            "EXEGPT_HEARTBEAT_TIMEOUT_S": "3",
        }
    )
    try:
        up = mesh.start(
            "up",
            "--model",
            MODEL,
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
        ready = [ln for ln in up.output if ln.startswith("[worker-") and "] ready " in ln]
        worker_pid = int(next(ln for ln in ready if ln.startswith("[worker-1]")).split("-")[-2])
        followers = [p for p in children_of(worker_pid)]
        assert len(followers) == 1  # rank 1 of worker-1's group

        prompts = [f"group {i}" for i in range(50)]
        async with httpx.AsyncClient(
            base_url=url, timeout=TIMEOUT_S, limits=httpx.Limits(max_connections=64)
        ) as client:
            responses = await asyncio.gather(*(client.post("/v1/completions", json=body(p, 8)) for p in prompts))
            texts = [r.json()["choices"][0]["text"] for r in responses]
            assert [r.json()["usage"]["completion_tokens"] for r in responses] == [8] * 50
            assert texts == solo_texts(prompts, 8)

            # a rank dies while its group runs requests: they complete elsewhere, once
            flowing, seen = asyncio.Event(), [0]

            def counted() -> None:
                seen[0] += 1
                if seen[0] >= 40:
                    flowing.set()

            async def stream(i: int) -> tuple[str, int, str | None]:
                return await stream_completion(client, body(f"survive {i}", LONG, stream=True), counted)

            tasks = [asyncio.create_task(stream(i)) for i in range(12)]
            await asyncio.wait_for(flowing.wait(), TIMEOUT_S)
            os.kill(followers[0], signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
        assert [(count, reason) for _, count, reason in results] == [(LONG, "length")] * 12
        assert [text for text, _, _ in results] == solo_texts([f"survive {i}" for i in range(12)], LONG)
        await asyncio.get_running_loop().run_in_executor(None, up.wait_line, "[worker-1] ready worker")
        assert any("worker-1" in ln and "restarting" in ln for ln in up.output)
        assert mesh.stop(up) == 0
    finally:
        for proc in mesh.procs:  # shown when the test fails
            print(f"--- {proc.label} output (last 60 lines)\n" + proc.tail(60))
        mesh.close()
        await purge_namespace(MeshConfig(namespace=namespace, amqp_url=AMQP_URL, redis_url=REDIS_URL), LocalHub())
