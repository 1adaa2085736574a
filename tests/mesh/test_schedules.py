"""Every policy runs for real: the schedules the optimizer plans, executed by the workers.

On both transports (in memory; RabbitMQ + Redis), with tiny-llama's greedy text compared with an
uninterrupted solo run of the same engine.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from common.names import Names
from common.scheduling import recent_lengths
from common.transport.connect import open_transports
from engine import load_engine
from engine.api import GenerationRequest, SamplingParams
from optimizer.schedule import Schedule
from optimizer.simulator import SimRequest, replay
from tests.mesh.conftest import running_mesh
from tests.mesh.fake_engine import FakeEngine

pytestmark = pytest.mark.usefixtures("cleanup")
MODEL = "tiny-llama"
TIMEOUT_S = 60

SCHEDULES = {
    "rra": Schedule(
        "rra",
        encode_batch=3,
        decode_batch=6,
        decode_iters_per_encode=3,
        num_devices=2,
        worker_devices=1,
        mean_input_len=6.0,
        mean_decode_batch=4.0,
    ),
    "waa-c": Schedule(
        "waa-c",
        encode_batch=3,
        decode_batch=6,
        num_devices=2,
        encoder_devices=1,
        decoder_devices=1,
        worker_devices=1,
        mean_input_len=6.0,
    ),
    "waa-m": Schedule(
        "waa-m", encode_batch=2, decode_batch=5, num_devices=2, encoder_devices=1, decoder_devices=1, worker_devices=1
    ),
    "static": Schedule("static", encode_batch=4, decode_batch=4, num_devices=2, worker_devices=1),
    "continuous": Schedule("continuous", encode_batch=2, decode_batch=5, num_devices=2, worker_devices=1),
    # prompts of 5 to 9 tokens beside up to 5 decodes in 8 tokens a step: most are prefilled in chunks
    "mixed": Schedule("mixed", encode_batch=3, decode_batch=5, chunk_tokens=8, num_devices=2, worker_devices=1),
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Two workers' engines and a third for the solo runs, loaded once for the module."""
    return [load_engine(MODEL, device="cpu") for _ in range(3)]


@pytest.fixture
def config(mesh_config):
    return mesh_config.model_copy(update={"model": MODEL, "device": "cpu"})


def solo(engine, prompt_ids: tuple[int, ...], n: int) -> str:
    events = engine.prefill([GenerationRequest("solo", prompt_ids, SamplingParams(n, ignore_eos=True))])
    while engine.running():
        events += engine.decode_step()
    return "".join(e.text for e in events)


def body(i: int, n: int) -> dict:
    return {
        "model": MODEL,
        "prompt": f"request {i} says " + "word " * (i % 5),
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
    }


async def run_load(m, count: int, lengths) -> list[dict]:
    responses = await asyncio.wait_for(
        asyncio.gather(*(m.client.post("/v1/completions", json=body(i, lengths(i))) for i in range(count))), TIMEOUT_S
    )
    assert [r.status_code for r in responses] == [200] * count, [r.text for r in responses if r.status_code != 200]
    return [r.json() for r in responses]


async def check_each_once(m, config, replies, engine, lengths) -> None:
    """Every request: the text of its solo run, its tokens, one finish record in the store."""
    for i, reply in enumerate(replies):
        ids = tuple(engine.tokenizer.encode(body(i, 0)["prompt"]))
        assert reply["choices"][0]["text"] == solo(engine, ids, lengths(i)), f"request {i}"
        assert reply["usage"]["completion_tokens"] == lengths(i)
    names = Names(config.namespace)
    t = await open_transports(config, names, m.hub)
    samples = await recent_lengths(t.store, names, 10_000)
    await t.close()
    ids = [s.request_id for s in samples]
    assert sorted(ids) == sorted(r["id"] for r in replies)  # one finish each, none lost


@pytest.mark.parametrize("policy", sorted(SCHEDULES))
async def test_each_policy_completes_every_request_once_with_the_solo_text(config, hub, engines, policy):
    schedule = SCHEDULES[policy]
    workers = iter(engines[:2])
    lengths = lambda i: 1 + (i * 7) % 13  # noqa: E731
    async with running_mesh(config, hub, lambda: next(workers), workers=2, schedule=schedule, trace=True) as m:
        roles = sorted(w.role for w in m.mesh.workers)
        assert roles == (["decoder", "encoder"] if schedule.split else ["worker", "worker"])
        replies = await run_load(m, 30, lengths)
        await check_each_once(m, config, replies, engines[2], lengths)
        assert all(w.follower.version == m.mesh.scheduler.current.version for w in m.mesh.workers)
        if policy == "static":  # finished slots kept computing until their batch ended
            assert any(b.plan.padding for w in m.mesh.workers for b in w.trace.boundaries)
        if policy == "mixed":  # prompts cut in chunks, folded into steps that decode
            plans = [b.plan for w in m.mesh.workers for b in w.trace.boundaries]
            assert any(not c.last for p in plans for c in p.chunks)
            assert any(p.chunks and p.decode for p in plans)


@pytest.mark.parametrize(
    "first, switches", [("rra", ("waa-c", "continuous", "rra")), ("mixed", ("waa-c", "mixed", "continuous"))]
)
async def test_a_switch_under_load_loses_duplicates_and_fails_nothing(config, hub, engines, first, switches):
    """RRA -> WAA-C -> continuous -> RRA (and mixed -> WAA-C -> mixed -> continuous, some requests
    part-way through a chunked prefill) while requests run; roles change, requests move (hand off,
    re-queue with the tokens sent), and every text is the uninterrupted one."""
    workers = iter(engines[:2])
    lengths = lambda i: 40 + (i * 11) % 60  # noqa: E731
    config = config.model_copy(update={"switch_drain_s": 0.0})  # move requests, not just finish them
    async with running_mesh(config, hub, lambda: next(workers), workers=2, schedule=SCHEDULES[first]) as m:
        load = asyncio.create_task(run_load(m, 48, lengths))
        for name in switches:
            await busy(m)
            await m.pin(SCHEDULES[name])
        replies = await load
        await check_each_once(m, config, replies, engines[2], lengths)
        moved = [w.moved for w in m.mesh.workers]
        assert sum(n for counts in moved for n in counts.values()) > 0, moved


async def busy(m) -> None:
    """Until every worker that decodes runs several requests (the next switch has work to move)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT_S
    while not all(len(w.driver.running) >= 3 for w in m.mesh.workers if w.role in ("worker", "decoder")):
        assert loop.time() < deadline
        await asyncio.sleep(0.01)  # a bounded look at in-process state, not a timing assertion


@pytest.mark.parametrize("policy", ["rra", "static", "continuous"])
async def test_a_workers_recorded_steps_replay_to_the_same_plans_in_the_simulator(config, hub, policy):
    """What the simulator runs is what the worker ran: its arrivals and step lengths, replayed
    through the simulator's driver and policy, give the same sequence of StepPlans."""
    schedule = replace(SCHEDULES[policy], num_devices=1)
    lengths = lambda i: 2 + (i * 5) % 9  # noqa: E731
    config = config.model_copy(update={"model": FAKE})
    async with running_mesh(config, hub, FakeEngine, schedule=schedule, trace=True) as m:
        output_len = {}
        for wave in (range(0, 10), range(10, 14), range(14, 30)):  # bursts, a lull, a burst
            replies = await asyncio.gather(
                *(m.client.post("/v1/completions", json=fake_body(i, lengths(i))) for i in wave)
            )
            output_len |= {r.json()["id"]: lengths(i) for i, r in zip(wave, replies)}
        trace = m.mesh.workers[0].trace
    origin = trace.arrivals[0].at_s
    requests = [
        SimRequest(a.request_id, a.input_len, output_len[a.request_id], a.at_s - origin) for a in trace.arrivals
    ]
    recorded = [b.plan for b in trace.boundaries if b.at_s >= origin and not b.plan.idle]
    replayed = replay(schedule, requests, trace.durations_s(since=origin))
    assert len(requests) == 30 and len(recorded) > 30
    assert replayed == recorded


FAKE = "tests.mesh.fake_engine:load"


def fake_body(i: int, n: int) -> dict:
    return {"model": FAKE, "prompt": f"prompt {i:03d} " + "x" * (i % 7), "max_tokens": n, "temperature": 0}


async def test_a_burst_keeps_hand_offs_and_kv_caches_within_the_decoders_credits(config, hub):
    """Ten times what the decoders can hold arrives at once: encoders encode only against
    credits, so the hand-off queue, the KV payloads in the store and each decoder's batch stay
    within the decoders' slots (B_D x decoders), with two encoders taking from one count."""
    schedule = Schedule(
        "waa-c", encode_batch=3, decode_batch=4, num_devices=4, encoder_devices=2, decoder_devices=2, worker_devices=1
    )
    capacity = schedule.decode_batch * schedule.decoder_workers
    # the bound holds within one allocation; a worker silent past a 1 s timeout on a loaded machine
    # would be re-allocated and the next version's decoders grant their slots afresh
    config = config.model_copy(update={"model": FAKE, "heartbeat_timeout_s": 30.0})
    names = Names(config.namespace)
    async with running_mesh(config, hub, FakeEngine, workers=4, schedule=schedule) as m:
        assert sorted(w.role for w in m.mesh.workers) == ["decoder", "decoder", "encoder", "encoder"]
        version = m.mesh.scheduler.current.version
        t = await open_transports(config, names, hub)
        seen = {"queue": 0, "payloads": 0, "batch": 0}
        done = asyncio.Event()

        async def watch() -> None:  # samples the bounded quantities until the burst is over
            while not done.is_set():
                seen["queue"] = max(seen["queue"], await t.bus.queue_depth(names.handoff_queue))
                seen["payloads"] = max(seen["payloads"], await t.store.count_prefix(names.kv_meta_prefix))
                decoding = [len(w.driver.running) + len(w.driver.incoming) for w in m.mesh.by_role("decoder")]
                seen["batch"] = max([seen["batch"], *decoding])
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        replies = await asyncio.wait_for(
            asyncio.gather(*(m.client.post("/v1/completions", json=fake_body(i, 12)) for i in range(10 * capacity))),
            TIMEOUT_S,
        )
        done.set()
        await watcher
        await t.close()
        assert m.mesh.scheduler.current.version == version  # one allocation throughout
    assert [r.status_code for r in replies] == [200] * (10 * capacity)
    assert 0 < seen["payloads"] <= capacity and seen["queue"] <= capacity, seen
    assert 0 < seen["batch"] <= schedule.decode_batch, seen
