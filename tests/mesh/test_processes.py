"""The mesh as separate processes over the real RabbitMQ and Redis, on tiny-llama.

One mesh (scheduler, 2 workers, gateway) serves the whole module; the tests that stop and kill a
worker run last.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid

import httpx
import pytest

from common.config import MeshConfig
from common.messages import codec
from common.messages.status import WorkerStatus
from common.names import Names
from common.scheduling import current_schedule, recent_lengths, request_schedule
from common.transport.connect import LocalHub, open_transports
from engine.parallel.procs import free_port
from optimizer.schedule import Schedule
from services.schedules import wire_schedule
from tests.brokers import AMQP_URL, REDIS_URL, require_broker
from tests.mesh.conftest import purge_namespace
from tests.mesh.processes import ProcessMesh, stream_completion

pytestmark = [pytest.mark.broker, pytest.mark.slow]
MODEL = "tiny-llama"
TIMEOUT_S = 120
LONG_TOKENS = 400  # long enough that requests still run when the test stops a worker, even on a loaded machine


@pytest.fixture(scope="module")
def cluster():
    require_broker()
    config = MeshConfig(
        namespace=f"p{uuid.uuid4().hex[:10]}",
        amqp_url=AMQP_URL,
        redis_url=REDIS_URL,
        model=MODEL,
        threads=1,
        port=free_port(),
        device="cpu",
        drain_timeout_s=10,
        heartbeat_s=0.5,
        heartbeat_timeout_s=3.0,
    )
    mesh = ProcessMesh({f"EXEGPT_{k.upper()}": str(v) for k, v in config.model_dump().items() if v is not None})
    try:
        scheduler = mesh.start("scheduler")
        scheduler.wait_line("ready")
        workers = [mesh.start("worker") for _ in range(2)]
        gateway = mesh.start("gateway")
        ids = [w.wait_line("ready").split()[-1] for w in workers]
        url = gateway.wait_line("ready gateway").split()[-1]
        yield {
            "config": config,
            "mesh": mesh,
            "url": url,
            "worker_ids": ids,
            "workers": workers,
            "gateway": gateway,
            "running": list(zip(ids, workers)),
            "scheduler": scheduler,
        }
    finally:
        mesh.close()
        asyncio.run(purge_namespace(config, LocalHub()))


def completion(prompt: str, n: int, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}


async def test_200_concurrent_requests_each_complete_once(cluster):
    lengths = [1 + i % 16 for i in range(200)]
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=cluster["url"], timeout=TIMEOUT_S, limits=limits) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/completions", json=completion(f"request number {i}", n)) for i, n in enumerate(lengths))
        )
    assert [r.status_code for r in responses] == [200] * 200
    bodies = [r.json() for r in responses]
    assert [b["usage"]["completion_tokens"] for b in bodies] == lengths
    assert len({b["id"] for b in bodies}) == 200
    config = cluster["config"]
    names = Names(config.namespace)
    t = await open_transports(config, names, LocalHub())
    samples = await recent_lengths(t.store, names, 1000)
    mine = [s for s in samples if s.request_id in {b["id"] for b in bodies}]
    assert len(mine) == 200 and len({s.request_id for s in mine}) == 200  # one finish each
    await t.close()


def ops_url(proc) -> str:
    """The operations port a worker or scheduler process logged at its start."""
    for line in proc.output:
        found = re.search(r"/metrics and /health/\* at (http://\S+)", line)
        if found:
            return found.group(1)
    raise AssertionError(f"{proc.label}: no ops port in its log")


async def test_every_process_serves_metrics_and_health(cluster):
    """Workers and the scheduler on their ops ports, the gateway on its own: live, ready, and
    the metrics of their kind."""
    targets = [(ops_url(w), "exegpt_worker_info") for w in cluster["workers"]]
    targets += [
        (ops_url(cluster["scheduler"]), "exegpt_scheduler_leader"),
        (cluster["url"], "exegpt_requests_in_flight"),
    ]
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        for url, metric in targets:
            assert (await client.get(f"{url}/health/live")).status_code == 200
            ready = await client.get(f"{url}/health/ready")
            assert ready.status_code == 200, (url, ready.text)
            assert all(ready.json()["checks"].values())
            assert metric in (await client.get(f"{url}/metrics")).text


def test_the_gateway_process_loads_no_model(cluster):
    """Workers map torch's library (they run the engine); the gateway only tokenizes, without it."""

    def maps_torch(proc) -> bool:
        with open(f"/proc/{proc.popen.pid}/maps") as maps:
            return "libtorch" in maps.read()

    if not os.path.exists(f"/proc/{cluster['gateway'].popen.pid}/maps"):
        pytest.skip("no /proc on this system")
    assert all(maps_torch(w) for w in cluster["workers"])
    assert not maps_torch(cluster["gateway"])


async def test_a_spare_gateway_waits_unbound_then_serves_once_woken(cluster):
    """`exegpt gateway --standby` (what `exegpt up` keeps beside its gateway) loads what a gateway
    needs, listens on nothing, and serves once a line reaches its stdin."""
    import psutil

    spare = cluster["mesh"].start("gateway", "--standby", "--port", "0", stdin=subprocess.PIPE)
    try:
        spare.wait_line("standby gateway")
        listening = [c for c in psutil.Process(spare.popen.pid).net_connections() if c.status == "LISTEN"]
        assert listening == []
        woken = time.monotonic()
        spare.popen.stdin.write("serve\n")
        spare.popen.stdin.flush()
        url = spare.wait_line("ready gateway").split()[-1]
        took = time.monotonic() - woken
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as client:
            response = await client.post("/v1/completions", json=completion("Hello", 4))
        assert response.status_code == 200, response.text
        assert took < 5.0  # it only binds and connects (a cold gateway also imports and loads)
    finally:
        cluster["mesh"].stop(spare)


async def test_streaming_through_the_processes(cluster):
    async with httpx.AsyncClient(base_url=cluster["url"], timeout=TIMEOUT_S) as client:
        whole = (await client.post("/v1/completions", json=completion("stream", 12))).json()
        async with client.stream("POST", "/v1/completions", json=completion("stream", 12, stream=True)) as response:
            assert response.status_code == 200
            lines = [ln[6:] async for ln in response.aiter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(ln) for ln in lines[:-1]]
    assert len(chunks) == 12
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


async def test_bad_input_through_the_processes(cluster):
    async with httpx.AsyncClient(base_url=cluster["url"], timeout=TIMEOUT_S) as client:
        bad = await client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
        unknown = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        negative = await client.post("/v1/completions", json=completion("x", -5))
        too_long = await client.post("/v1/completions", json=completion("word " * 5000, 4))
    assert [r.status_code for r in (bad, unknown, negative, too_long)] == [400, 404, 400, 400]
    assert all("error" in r.json() for r in (bad, unknown, negative, too_long))


async def test_a_pinned_schedule_reaches_every_worker_process(cluster):
    config = cluster["config"]
    names = Names(config.namespace)
    t = await open_transports(config, names, LocalHub())
    statuses = await t.bus.subscribe(names.status_exchange, names.status_queue(f"test-{uuid.uuid4().hex[:6]}"))
    schedule = Schedule(
        "rra", encode_batch=4, decode_batch=16, decode_iters_per_encode=2, num_devices=2, worker_devices=1
    )
    await request_schedule(t.bus, names, wire_schedule(schedule))
    applied: set[str] = set()
    async with asyncio.timeout(TIMEOUT_S):
        async for delivery in statuses:
            status = codec.decode(delivery.body, WorkerStatus)
            await delivery.ack()
            update = await current_schedule(t.store, names)
            if (
                status.state == "applied"
                and update.schedule == wire_schedule(schedule)
                and status.schedule_version >= update.version
            ):
                applied.add(status.worker_id)
            if applied >= set(cluster["worker_ids"]):
                break
    assert applied == set(cluster["worker_ids"])
    await t.close()


def solo_texts(prompts: list[str], n_tokens: int) -> list[str]:
    """Each prompt's greedy text from the engine in this process, alone (the uninterrupted run)."""
    from engine import load_engine
    from engine.api import GenerationRequest, SamplingParams

    engine = load_engine(MODEL, device="cpu")
    texts = []
    for i, prompt in enumerate(prompts):
        ids = tuple(engine.tokenizer.encode(prompt))
        params = SamplingParams(max_tokens=n_tokens, ignore_eos=True)
        events = engine.prefill([GenerationRequest(f"solo{i}", ids, params)])
        while engine.running():
            events += engine.decode_step()
        texts.append("".join(e.text for e in events))
    return texts


async def running_counts(cluster) -> dict[str, int]:
    """Requests each worker runs, from one heartbeat of every worker process still up."""
    config = cluster["config"]
    names = Names(config.namespace)
    t = await open_transports(config, names, LocalHub())
    statuses = await t.bus.subscribe(names.status_exchange, names.status_queue(f"count-{uuid.uuid4().hex[:6]}"))
    wanted = {worker_id for worker_id, _ in cluster["running"]}
    counts: dict[str, int] = {}
    async with asyncio.timeout(TIMEOUT_S):
        async for delivery in statuses:
            status = codec.decode(delivery.body, WorkerStatus)
            await delivery.ack()
            if status.worker_id in wanted:
                counts[status.worker_id] = status.running
            if set(counts) >= wanted:
                break
    await t.close()
    return counts


async def stream_until_running(cluster, n_requests: int, n_tokens: int, stop_one):
    """Stream requests; once tokens flow, ``stop_one(proc)`` the worker running the most.

    Returns each request's (text, token count, finish reason) and how many the stopped one ran."""
    async with httpx.AsyncClient(
        base_url=cluster["url"], timeout=TIMEOUT_S, limits=httpx.Limits(max_connections=64)
    ) as client:
        flowing, seen = asyncio.Event(), [0]

        def counted() -> None:
            seen[0] += 1
            if seen[0] >= n_requests * 2:
                flowing.set()

        async def one(i: int) -> tuple[str, int, str | None]:
            return await stream_completion(client, completion(f"survive {i}", n_tokens, stream=True), counted)

        tasks = [asyncio.create_task(one(i)) for i in range(n_requests)]
        await asyncio.wait_for(flowing.wait(), TIMEOUT_S)
        counts = await running_counts(cluster)
        held, (worker_id, proc) = max((counts[w], (w, p)) for w, p in cluster["running"])
        cluster["running"].remove((worker_id, proc))
        await asyncio.get_running_loop().run_in_executor(None, stop_one, proc)
        results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
    return results, held


async def test_a_worker_stopped_with_sigterm_drains_its_batch(cluster):
    """SIGTERM: the worker stops taking work, finishes what it runs, exits 0."""
    extra = cluster["mesh"].start("worker")
    cluster["running"].append((extra.wait_line("ready").split()[-1], extra))
    exit_codes = []
    results, held = await stream_until_running(
        cluster, 24, LONG_TOKENS, lambda proc: exit_codes.append(cluster["mesh"].stop(proc))
    )
    assert [(count, reason) for _, count, reason in results] == [(LONG_TOKENS, "length")] * 24
    assert held > 0 and exit_codes == [0]


async def test_a_worker_killed_mid_batch_loses_nothing(cluster):
    """SIGKILL one worker while requests run: every request still completes, once, with the text
    an uninterrupted run gives."""
    results, held = await stream_until_running(cluster, 24, LONG_TOKENS, cluster["mesh"].kill)
    assert [(count, reason) for _, count, reason in results] == [(LONG_TOKENS, "length")] * 24
    assert [text for text, _, _ in results] == solo_texts([f"survive {i}" for i in range(24)], LONG_TOKENS)
    assert held > 0  # the victim really was running some of them
