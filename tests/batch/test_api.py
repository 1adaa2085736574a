"""The OpenAI Batch API mounted in the gateway, running jobs through an in-process mesh (tiny-llama)."""

import asyncio
import contextlib
import json

import httpx
import pytest

from common.names import Names
from common.transport.connect import LocalHub, open_bus, open_store
from services.batch.api import batch_lifespan, batch_router
from services.batch.consumer import ConsumerConfig, JobConsumer
from services.batch.executor import EchoExecutor
from services.gateway import ServedModel, create_app
from services.hosting.engines import EngineRunner
from services.run.embedded import local_workers

MODEL = "tiny-llama"
TIMEOUT_S = 60


@pytest.fixture
def config(batch_config):
    return batch_config.model_copy(update={"model": MODEL, "threads": 1, "device": "cpu"})


@pytest.fixture(scope="module")
def engines():
    """Loading costs seconds: two workers' engines for the whole module."""
    from common.config import MeshConfig
    from services.hosting.engines import load_engine as load

    cfg = MeshConfig(model=MODEL, threads=1, device="cpu")
    return load(cfg), load(cfg)


@contextlib.asynccontextmanager
async def gateway(config, engines, **router_args):
    hub = LocalHub()
    runners = [EngineRunner(e) for e in engines]
    model = ServedModel(MODEL, engines[0].tokenizer, engines[0].max_context)
    app = create_app(
        config,
        model,
        hub=hub,
        routers=(batch_router(),),
        lifespans=(batch_lifespan(**router_args),),
        workers=lambda: local_workers(config, hub, runners=runners),
    )
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                yield client, app, hub
    finally:
        await purge(config, hub)


async def purge(config, hub):
    names = Names(config.namespace)
    bus = await open_bus(config, names, hub)
    await bus.delete(
        queues=[names.encode_queue, names.handoff_queue, names.dead_queue, names.jobs_queue],
        exchanges=[names.control_exchange, names.status_exchange, names.dead_exchange],
    )
    await bus.close()
    store = await open_store(config) or hub.store
    await store.delete_prefix(names.key_prefix)
    if store is not hub.store:
        await store.close()


def handled_event(consumer, count):
    """An event set once the consumer has handled ``count`` jobs."""
    event, seen = asyncio.Event(), []

    def on_handled(result, stored):
        seen.append(result.job_id)
        if len(seen) >= count:
            event.set()

    consumer.on_handled = on_handled
    return event


def line(custom_id, body, url="/v1/completions"):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


async def upload(client, lines):
    content = ("\n".join(lines) + "\n").encode()
    resp = await client.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", content, "application/jsonl")}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_batch_runs_valid_lines_and_reports_invalid_ones(config, engines):
    lines = [
        line("a", {"model": MODEL, "prompt": "hello there", "max_tokens": 3, "ignore_eos": True}),
        "{not json",
        line("b", {"model": MODEL, "max_tokens": 3}),  # no prompt
        line("c", {"model": MODEL, "prompt": "second one", "max_tokens": 5, "ignore_eos": True}),
        line("d", {"model": "gpt-9", "prompt": "x", "max_tokens": 2}),  # model not served
        line("a", {"model": MODEL, "prompt": "dup", "max_tokens": 2}),  # duplicate custom_id
        line("e", {"model": MODEL, "prompt": "third", "max_tokens": 2, "ignore_eos": True}),
    ]
    async with gateway(config, engines) as (client, app, _):
        done = handled_event(app.state.batch_consumer, 3)
        file = await upload(client, lines)
        assert file["purpose"] == "batch" and file["object"] == "file"
        resp = await client.post(
            "/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
        )
        assert resp.status_code == 200, resp.text
        batch = resp.json()
        assert batch["status"] in ("in_progress", "completed")
        assert batch["request_counts"]["total"] == 7
        await asyncio.wait_for(done.wait(), TIMEOUT_S)
        batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {"total": 7, "completed": 3, "failed": 4}
        output = (await client.get(f"/v1/files/{batch['output_file_id']}/content")).text
        errors = (await client.get(f"/v1/files/{batch['error_file_id']}/content")).text
        listed = (await client.get("/v1/batches")).json()
    out = [json.loads(x) for x in output.splitlines()]
    assert [o["custom_id"] for o in out] == ["a", "c", "e"]  # input order, each once
    assert all(o["response"]["status_code"] == 200 for o in out)
    assert [o["response"]["body"]["usage"]["completion_tokens"] for o in out] == [3, 5, 2]
    assert out[0]["response"]["body"]["object"] == "text_completion"
    err = [json.loads(x) for x in errors.splitlines()]
    assert [e["error"]["line"] for e in err] == [2, 3, 5, 6]
    assert "prompt" in err[1]["error"]["message"] and "gpt-9" in err[2]["error"]["message"]
    assert "duplicate" in err[3]["error"]["message"]
    assert [b["id"] for b in listed["data"]] == [batch["id"]]


async def test_chat_batch(config, engines):
    lines = [
        line(
            f"q{i}",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"hi {i}"}],
                "max_completion_tokens": 2,
                "ignore_eos": True,
            },
            "/v1/chat/completions",
        )
        for i in range(5)
    ]
    async with gateway(config, engines) as (client, app, _):
        done = handled_event(app.state.batch_consumer, 5)
        file = await upload(client, lines)
        batch = (
            await client.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions"})
        ).json()
        await asyncio.wait_for(done.wait(), TIMEOUT_S)
        batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
        output = (await client.get(f"/v1/files/{batch['output_file_id']}/content")).text
    assert batch["status"] == "completed" and batch["error_file_id"] is None
    bodies = [json.loads(x)["response"]["body"] for x in output.splitlines()]
    assert len(bodies) == 5 and all(b["object"] == "chat.completion" for b in bodies)
    assert all(b["usage"]["completion_tokens"] == 2 for b in bodies)


async def test_cancelled_batch(config, engines):
    lines = [line(f"r{i}", {"model": MODEL, "prompt": f"p{i}", "max_tokens": 2}) for i in range(10)]
    async with gateway(config, engines, run_consumer=False) as (client, app, hub):
        file = await upload(client, lines)
        batch = (
            await client.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/completions"})
        ).json()
        cancelling = (await client.post(f"/v1/batches/{batch['id']}/cancel")).json()
        assert cancelling["status"] == "cancelling"
        # a consumer that starts after the cancel finds every job cancelled
        gw = app.state.gateway
        consumer = JobConsumer(
            gw.bus, app.state.batches.data, Names(config.namespace), EchoExecutor(), ConsumerConfig("late")
        )
        done, stop = handled_event(consumer, 10), asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        await asyncio.wait_for(done.wait(), TIMEOUT_S)
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
        batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
        errors = (await client.get(f"/v1/files/{batch['error_file_id']}/content")).text
    assert batch["status"] == "cancelled" and batch["output_file_id"] is None
    codes = [json.loads(x)["error"]["code"] for x in errors.splitlines()]
    assert codes == ["batch_cancelled"] * 10


@pytest.mark.parametrize(
    "call, status",
    [
        (("post", "/v1/batches", {"json": {"input_file_id": "file-nope", "endpoint": "/v1/completions"}}), 404),
        (("post", "/v1/batches", {"json": {"input_file_id": "x", "endpoint": "/v1/embeddings"}}), 400),
        (("get", "/v1/batches/batch_nope", {}), 404),
        (("get", "/v1/files/file-nope/content", {}), 404),
        (
            (
                "post",
                "/v1/files",
                {"data": {"purpose": "fine-tune"}, "files": {"file": ("x.jsonl", b"{}", "application/jsonl")}},
            ),
            400,
        ),
    ],
)
async def test_bad_calls_get_openai_errors(config, engines, call, status):
    method, path, kwargs = call
    async with gateway(config, engines, run_consumer=False) as (client, _, _):
        resp = await getattr(client, method)(path, **kwargs)
    assert resp.status_code == status
    assert "message" in resp.json()["error"]


def test_every_gateway_the_cli_starts_gets_the_batch_api():
    from services.run.plugins import gateway_plugins

    routers, lifespans = gateway_plugins()
    paths = {route.path for router in routers for route in router.routes}
    assert {
        "/v1/files",
        "/v1/files/{file_id}/content",
        "/v1/batches",
        "/v1/batches/{batch_id}",
        "/v1/batches/{batch_id}/cancel",
    } <= paths
    assert lifespans
