"""The services together, in one process, on each transport (memory; RabbitMQ + Redis)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from common.messages import codec
from common.messages.handoff import KvReady
from common.messages.status import WorkerStatus
from common.messages.work import EncodeWork, Sampling
from common.names import Names
from common.scheduling import recent_lengths
from common.transport.connect import open_bus, open_transports
from engine.api import GenerationRequest, SamplingParams
from optimizer.schedule import Schedule
from services.hosting.handoffs import kv_payload
from tests.brokers import need
from tests.mesh.conftest import running_mesh
from tests.mesh.fake_engine import FakeEngine, load, next_token

pytestmark = pytest.mark.usefixtures("cleanup")
FAKE = "tests.mesh.fake_engine:load"
TIMEOUT_S = 30
WAA = Schedule(
    "waa-c", encode_batch=4, decode_batch=8, num_devices=2, encoder_devices=1, decoder_devices=1, worker_devices=1
)


@pytest.fixture
def config(mesh_config):
    return mesh_config.model_copy(update={"model": FAKE})


def expected_text(prompt: str, n: int) -> str:
    previous, out = ord(prompt[-1]), []
    for i in range(n):
        previous = next_token(previous, i)
        out.append(chr(previous))
    return "".join(out)


def completion(prompt: str, n: int, **extra) -> dict:
    return {"model": FAKE, "prompt": prompt, "max_tokens": n, "temperature": 0, **extra}


async def test_completion_runs_through_one_worker(config, hub):
    async with running_mesh(config, hub, load) as m:
        response = await m.client.post("/v1/completions", json=completion("hello", 7))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["text"] == expected_text("hello", 7)
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        worker = m.mesh.workers[0]
        assert worker.role == "worker" and worker.steps == 7  # one prefill, six decode steps


async def test_concurrent_requests_each_complete_once(config, hub):
    async with running_mesh(config, hub, load, workers=2) as m:
        prompts = [f"p{i:03d}" for i in range(60)]
        lengths = [1 + i % 9 for i in range(60)]
        responses = await asyncio.gather(
            *(m.client.post("/v1/completions", json=completion(p, n)) for p, n in zip(prompts, lengths))
        )
        assert [r.status_code for r in responses] == [200] * 60
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 60
        for r, p, n in zip(responses, prompts, lengths):
            assert r.json()["choices"][0]["text"] == expected_text(p, n)
            assert r.json()["usage"]["completion_tokens"] == n
        t = await open_transports(config, Names(config.namespace), hub)
        samples = await recent_lengths(t.store, Names(config.namespace), 100)
        await t.close()
        assert sorted(s.output_len for s in samples) == sorted(lengths)
        assert all(not w.driver.running and not w.held for w in m.mesh.workers)


async def test_streaming_matches_the_whole_response(config, hub):
    async with running_mesh(config, hub, load) as m:
        body = completion("stream me", 6, stream=True, stream_options={"include_usage": True})
        response = await m.client.post("/v1/completions", json=body)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [ln[len("data: ") :] for ln in response.text.splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(ln) for ln in lines[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert text == expected_text("stream me", 6)
        assert chunks[-1]["usage"]["completion_tokens"] == 6
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


async def test_chat_streaming_sends_role_then_content(config, hub):
    async with running_mesh(config, hub, load) as m:
        body = {"model": FAKE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        response = await m.client.post("/v1/chat/completions", json=body)
        lines = [ln[6:] for ln in response.text.splitlines() if ln.startswith("data: ")]
        chunks = [json.loads(ln) for ln in lines[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert len(content) == 4 and lines[-1] == "[DONE]"


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "model"),
        (json.dumps(completion("x", -1)).encode(), 400, "max_tokens"),
        (json.dumps(completion("x", 10**9)).encode(), 400, "max_tokens"),
        (json.dumps(completion("x" * 300, 4)).encode(), 400, "prompt"),
        (json.dumps(completion("", 4)).encode(), 400, "prompt"),
        (json.dumps({"model": FAKE}).encode(), 400, "prompt"),
        (json.dumps(completion("x", 4, temperature=-1)).encode(), 400, "temperature"),
        (json.dumps([1, 2]).encode(), 400, None),
    ],
)
async def test_bad_input_gets_an_openai_error(config, hub, body, status, param):
    async with running_mesh(config, hub, load) as m:
        response = await m.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param
        healthy = await m.client.post("/v1/completions", json=completion("ok", 2))
        assert healthy.status_code == 200


async def test_models_health_and_metrics(config, hub):
    async with running_mesh(config, hub, load) as m:
        assert (await m.client.get("/health")).json()["status"] == "ok"
        models = (await m.client.get("/v1/models")).json()
        assert [d["id"] for d in models["data"]] == [FAKE]
        assert models["data"][0]["max_model_len"] == m.app.state.model.max_context  # what loadgen caps prompts by
        await m.client.post("/v1/completions", json=completion("abc", 5))
        text = (await m.client.get("/metrics")).text
        assert 'exegpt_requests_total{endpoint="completions",status="200"} 1.0' in text
        assert "exegpt_ttft_seconds_count 1.0" in text
        assert "exegpt_e2e_seconds_count 1.0" in text
        assert 'exegpt_batch_size_count{role="worker"}' in text
        assert "exegpt_queue_depth" in text
        for phase in ("queue", "encode", "decode"):  # no hand-off: the worker decodes what it encodes
            assert f'exegpt_phase_seconds_count{{phase="{phase}"}} 1.0' in text


async def wait_for_statuses(subscription, worker_ids: set[str], version: int) -> set[str]:
    seen: set[str] = set()
    async with asyncio.timeout(TIMEOUT_S):
        async for delivery in subscription:
            status = codec.decode(delivery.body, WorkerStatus)
            await delivery.ack()
            if status.schedule_version == version and status.state == "applied":
                seen.add(status.worker_id)
            if seen >= worker_ids:
                return seen
    return seen


async def test_schedule_update_reaches_every_worker_and_changes_batching(config, hub):
    names = Names(config.namespace)
    async with running_mesh(config, hub, load, workers=2) as m:
        t = await open_transports(config, names, hub)
        statuses = await t.bus.subscribe(names.status_exchange, names.status_queue("test"))
        update = await m.mesh.scheduler.pin(
            Schedule("continuous", encode_batch=1, decode_batch=3, num_devices=2, worker_devices=1)
        )
        ids = {w.worker_id for w in m.mesh.workers}
        assert await wait_for_statuses(statuses, ids, update.version) == ids
        # every worker applied it; a later version (the scheduler may publish again) counts too
        assert all(w.follower.version >= update.version for w in m.mesh.workers)
        before = [len(w.runner.engine.prefill_sizes) for w in m.mesh.workers]
        responses = await asyncio.gather(
            *(m.client.post("/v1/completions", json=completion(f"q{i}", 20)) for i in range(12))
        )
        assert all(r.status_code == 200 for r in responses)
        for worker, n in zip(m.mesh.workers, before):
            assert set(worker.runner.engine.prefill_sizes[n:]) <= {1}
        assert max(w.max_batch_seen for w in m.mesh.workers) <= 3
        await t.close()


async def test_every_worker_is_allocated_and_follows_one_version(config, hub):
    async with running_mesh(config, hub, load, workers=2) as m:
        current = m.mesh.scheduler.current
        assert {a.worker_id for a in current.allocation} == {w.worker_id for w in m.mesh.workers}
        await m.pin(WAA)
        assert sorted(w.role for w in m.mesh.workers) == ["decoder", "encoder"]
        assert len({w.follower.version for w in m.mesh.workers}) == 1


async def test_undecodable_work_goes_to_the_dead_queue(config, hub):
    names = Names(config.namespace)
    async with running_mesh(config, hub, load) as m:
        t = await open_transports(config, names, hub)
        await t.bus.publish(names.encode_queue, b"\x93garbage")
        dead = await t.bus.consume(names.dead_queue, prefetch=1)
        delivery = await asyncio.wait_for(anext(aiter(dead)), TIMEOUT_S)
        assert delivery.body == b"\x93garbage"
        await delivery.ack()
        assert (await m.client.post("/v1/completions", json=completion("still", 3))).status_code == 200
        await t.close()


class StuckEngine(FakeEngine):
    """Hangs in its first step that decodes until released: a worker that dies mid-batch."""

    def __init__(self, entered, release) -> None:
        super().__init__()
        self.entered, self.release = entered, release

    def step(self, prefill=(), decode=(), padding=0):
        if decode:
            self.entered.set()
            self.release.wait(TIMEOUT_S)
        return super().step(prefill, decode, padding)


@pytest.mark.parametrize("schedule", [None, WAA], ids=["worker", "waa-decoder"])
async def test_a_worker_dying_mid_batch_loses_nothing(config, hub, schedule):
    import threading

    entered, release = threading.Event(), threading.Event()
    stuck = StuckEngine(entered, release)
    engines = iter([FakeEngine(), stuck])
    try:
        async with running_mesh(config, hub, lambda: next(engines), workers=2, schedule=schedule) as m:
            victim = next(w for w in m.mesh.workers if w.runner.engine is stuck)
            assert victim.role == ("decoder" if schedule else "worker")  # ids sort in start order
            requests = [
                asyncio.create_task(m.client.post("/v1/completions", json=completion(f"k{i}", 12))) for i in range(8)
            ]
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, entered.wait, TIMEOUT_S)
            held = len(victim.held)  # requests it holds unacked (queued, merging or running)
            await crash(victim, m.mesh.tasks[1 + m.mesh.workers.index(victim)])
            responses = await asyncio.wait_for(asyncio.gather(*requests), TIMEOUT_S)
            assert held > 0
            for i, r in enumerate(responses):
                assert r.json()["choices"][0]["text"] == expected_text(f"k{i}", 12)
    finally:
        release.set()


@pytest.mark.broker
@pytest.mark.parametrize("transport_kind", ["broker"])
@pytest.mark.parametrize("kv_transport", ["nixl", "redis"])
async def test_a_waa_decoder_dying_with_handoffs_unread_loses_nothing(config, hub, kv_transport):
    """Hand-offs made while the decoder hangs are never read by it; when it dies, the worker
    that takes the decoder's place (here the encoder that made them; over NIXL, from its own
    staging pool) decodes them from that KV, without encoding them again."""
    import threading

    from common.transport.nixl_kv import NixlKv
    from tests.brokers import nixl_loads

    if kv_transport == "nixl":
        need(nixl_loads(), "NIXL (nixl-cu12) cannot load: pip install nixl-cu12")
    config = config.model_copy(update={"kv_transport": kv_transport})
    entered, release = threading.Event(), threading.Event()
    stuck = StuckEngine(entered, release)
    engines = iter([FakeEngine(), stuck])
    try:
        async with running_mesh(config, hub, lambda: next(engines), workers=2, schedule=WAA) as m:
            encoder, victim = m.mesh.by_role("encoder")[0], m.mesh.by_role("decoder")[0]
            assert victim.runner.engine is stuck and isinstance(encoder.kv, NixlKv) == (kv_transport == "nixl")
            puts, staged = Counter(), asyncio.Event()
            put = encoder.kv.put

            async def counted(handoff, **kw):
                ref = await put(handoff, **kw)
                puts[handoff.request_id] += 1
                if len(puts) == 8:
                    staged.set()
                return ref

            encoder.kv.put = counted
            post = lambda i: asyncio.create_task(m.client.post("/v1/completions", json=completion(f"u{i}", 12)))
            first = [post(i) for i in range(4)]
            assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, TIMEOUT_S)
            second = [post(i) for i in range(4, 8)]  # encoded and staged while the decoder hangs
            await asyncio.wait_for(staged.wait(), TIMEOUT_S)
            unread = {rid for rid in puts if rid not in victim.held}
            await crash(victim, m.mesh.tasks[1 + m.mesh.workers.index(victim)])
            responses = await asyncio.wait_for(asyncio.gather(*first, *second), TIMEOUT_S)
            for i, r in enumerate(responses):
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == expected_text(f"u{i}", 12)
            assert unread and all(puts[rid] == 1 for rid in unread)  # decoded from the KV staged before
            assert getattr(encoder.kv, "staged_bytes", 0) == 0
    finally:
        release.set()


async def crash(worker, task) -> None:
    """What a process dying does: everything it ran stops, its connection drops (unacked
    messages go back), its heartbeats stop."""
    for t in (task, *worker._tasks):
        t.cancel()
    await asyncio.gather(task, *worker._tasks, return_exceptions=True)
    await worker.transports.bus.close()


class BrokenEngine(FakeEngine):
    def step(self, prefill=(), decode=(), padding=0):
        raise RuntimeError("device lost")


async def test_an_engine_fault_becomes_a_500_not_a_hang(config, hub):
    async with running_mesh(config, hub, BrokenEngine) as m:
        response = await m.client.post("/v1/completions", json=completion("boom", 3))
        assert response.status_code == 500
        assert "device lost" in response.json()["error"]["message"]
        assert m.mesh.tasks[1].done() is False  # the worker keeps serving


async def test_a_long_non_streaming_answer_arrives_whole_in_chunks(config, hub):
    async with running_mesh(config, hub, load) as m:
        response = await m.client.post("/v1/completions", json=completion("long", 150))
        assert response.json()["choices"][0]["text"] == expected_text("long", 150)
        streamed = await m.client.post("/v1/completions", json=completion("long", 150, stream=True))
        chunks = [ln for ln in streamed.text.splitlines() if ln.startswith("data: {")]
        assert len(chunks) == 150  # streaming still gets every token on its own


async def test_an_aborted_request_leaves_the_batch(config, hub):
    import threading

    entered, release = threading.Event(), threading.Event()
    async with running_mesh(config, hub, lambda: StuckEngine(entered, release)) as m:
        try:
            worker, gateway = m.mesh.workers[0], m.app.state.gateway
            aborted = asyncio.Event()
            on_control = worker.on_control
            worker.on_control = lambda message: (on_control(message), aborted.set())
            pending = await gateway.submit([104, 105], Sampling(max_tokens=200))
            assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, TIMEOUT_S)
            await gateway.abort(pending)  # what a client hanging up mid-stream does
            await asyncio.wait_for(aborted.wait(), TIMEOUT_S)
            release.set()
            after = await m.client.post("/v1/completions", json=completion("next", 3))
            assert after.status_code == 200  # the loop went round: the abort was applied first
            assert pending.request_id not in worker.driver.running
            assert worker.runner.engine.running() == []
            t = await open_transports(config, Names(config.namespace), hub)
            assert await t.store.get(Names(config.namespace).done(pending.request_id)) == b"1"
            await t.close()
        finally:
            release.set()


@pytest.mark.parametrize("schedule", [None, WAA], ids=["worker", "waa"])
async def test_every_lifecycle_stage_is_stamped_in_order(config, hub, schedule):
    from common.lifecycle import Stage

    async with running_mesh(config, hub, load, workers=2, schedule=schedule) as m:
        pending = await m.app.state.gateway.submit(
            [104, 105], Sampling(max_tokens=6), stream=False, timeout_s=TIMEOUT_S
        )
        tokens = [t async for t in pending.tokens()]
        stamps = pending.timeline.stamps
        handed = [Stage.HANDED_OFF] if schedule is not None else []  # only WAA moves the KV cache
        assert set(stamps) == set(Stage) - ({Stage.HANDED_OFF} - set(handed)) and len(tokens) == 6
        path = [Stage.ARRIVED, Stage.ENCODE_START, Stage.ENCODE_END, *handed, Stage.DECODE_START, Stage.FINISHED]
        assert [stamps[s] for s in path] == sorted(stamps[s] for s in path)
        assert stamps[Stage.FIRST_TOKEN] <= stamps[Stage.FINISHED]
        assert pending.timeline.ttft_s > 0 and pending.timeline.tpot_s >= 0


async def test_work_for_another_model_fails_instead_of_running(config, hub):
    from common.messages.events import EventBatch

    names = Names(config.namespace)
    async with running_mesh(config, hub, load):
        t = await open_transports(config, names, hub)
        queue = names.events_queue("other")
        await t.bus.declare_queue(queue, exclusive=True)
        events = await t.bus.consume(queue, prefetch=10)
        work = EncodeWork("r-other", "some-other-model", (104,), Sampling(4), queue, 0.0)
        await t.bus.publish(names.encode_queue, codec.encode(work))
        delivery = await asyncio.wait_for(anext(aiter(events)), TIMEOUT_S)
        batch = codec.decode(delivery.body, EventBatch)
        assert [(f.request_id, f.status) for f in batch.failures] == [("r-other", 400)]
        assert batch.tokens == ()
        await t.close()


async def test_a_prompt_may_be_token_ids(config, hub):
    async with running_mesh(config, hub, load) as m:
        by_text = (await m.client.post("/v1/completions", json=completion("hi", 4))).json()
        by_ids = (await m.client.post("/v1/completions", json=completion([104, 105], 4))).json()
        assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"] == expected_text("hi", 4)
        assert by_ids["usage"]["prompt_tokens"] == 2


async def test_two_gateways_share_the_workers_and_get_only_their_own_events(config, hub):
    import httpx

    from services.gateway import ServedModel, create_app

    async with running_mesh(config, hub, load) as m:
        engine = m.mesh.workers[0].runner.engine
        second = create_app(config, ServedModel(FAKE, engine.tokenizer, engine.max_context), hub=hub)
        async with second.router.lifespan_context(second):
            transport = httpx.ASGITransport(app=second)
            async with httpx.AsyncClient(transport=transport, base_url="http://second") as other:
                both = await asyncio.gather(
                    *(m.client.post("/v1/completions", json=completion(f"a{i}", 5)) for i in range(10)),
                    *(other.post("/v1/completions", json=completion(f"b{i}", 7)) for i in range(10)),
                )
        a, b = both[:10], both[10:]
        assert [r.json()["choices"][0]["text"] for r in a] == [expected_text(f"a{i}", 5) for i in range(10)]
        assert [r.json()["choices"][0]["text"] for r in b] == [expected_text(f"b{i}", 7) for i in range(10)]
        assert second.state.gateway.events_queue != m.app.state.gateway.events_queue


class RefusingEngine(FakeEngine):
    def import_request(self, handoff):
        raise ValueError("hand-off from another model")


async def test_a_refused_hand_off_becomes_a_500_and_the_decoder_keeps_serving(config, hub):
    async with running_mesh(config, hub, RefusingEngine, workers=2, schedule=WAA) as m:
        response = await m.client.post("/v1/completions", json=completion("x", 3))
        assert response.status_code == 500
        assert "another model" in response.json()["error"]["message"]
        single = await m.client.post("/v1/completions", json=completion("y", 1))  # no hand-off
        assert single.status_code == 200 and not any(t.done() for t in m.mesh.tasks)


async def test_work_redelivered_after_its_request_finished_is_not_run_again(config, hub):
    """An encoder and a decoder died after the request finished but before acking: their messages
    come back redelivered, and are acked without encoding or decoding anything."""
    names = Names(config.namespace)
    t = await open_transports(config, names, hub)
    engine = FakeEngine()
    engine.prefill([GenerationRequest("r-old", (104, 105), SamplingParams(max_tokens=5))])
    ref = await t.kv.put(kv_payload(engine.export_request("r-old")), producer="enc-gone", ttl_s=60)
    await t.store.set(names.done("r-old"), b"1", ttl_s=60)
    work = EncodeWork("r-old", FAKE, (104, 105), Sampling(max_tokens=5), "nobody", 0.0, False)
    ready = KvReady("r-old", "enc-gone", "nobody", ref, 2, 0, 0.0, False)
    for queue, message in ((names.encode_queue, work), (names.handoff_queue, ready)):
        await t.bus.declare_queue(queue)
        await t.bus.publish(queue, codec.encode(message))
    dying = await open_bus(config, names, hub)
    for queue in (names.encode_queue, names.handoff_queue):
        await asyncio.wait_for(anext(aiter(await dying.consume(queue, prefetch=1))), TIMEOUT_S)
    await dying.close()  # unacked: both come back with ``redelivered`` set
    async with running_mesh(config, hub, load, workers=2, schedule=WAA) as m:
        response = await m.client.post("/v1/completions", json=completion("hello", 4))
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
        encoder, decoder = m.mesh.by_role("encoder")[0], m.mesh.by_role("decoder")[0]
        assert encoder.runner.engine.prefill_sizes == [1]  # only the new request
        assert decoder.steps == 3  # tokens 1..3 of the new request, nothing else
    samples = await recent_lengths(t.store, names, 10)
    await t.close()
    assert [s.output_len for s in samples] == [4]
