"""What a worker reports of its steps: their shape in the profile's terms, their interval in the
loop, and a bounded sample."""

import asyncio
import math
import statistics
import time
from collections import Counter

import pytest

from common.messages.status import STEP_COSTS_PER_KIND
from optimizer.policies import PrefillChunk, StepPlan
from optimizer.schedule import Schedule
from services.worker.costs import StepSampler, step_cost
from services.worker.worker import Worker
from tests.mesh.conftest import running_mesh
from tests.mesh.fake_engine import FakeEngine


def test_a_step_is_described_as_the_profile_costs_it():
    plan = StepPlan(encode=("a", "b"), decode=("c", "d", "e"), padding=1)
    cost = step_cost(plan, {"a": 30, "b": 40}, [10, 20, 30], False, 0.05, 7.0)
    assert (cost.kind, cost.prefill_seqs, cost.prefill_tokens, cost.decode_seqs) == ("mixed", 2, 70, 4)
    assert cost.prefill_seq == math.sqrt((30**2 + 40**2) / 2) and cost.decode_ctx == 20
    assert (cost.seconds, cost.at) == (0.05, 7.0)
    decode = step_cost(StepPlan(decode=("c",)), {}, [12], False, 0.01, 8.0)
    assert (decode.kind, decode.prefill_seqs, decode.decode_seqs) == ("decode", 0, 1)
    # a chunk of 8 tokens starting at 16 does a prompt's attention of sqrt(8 x (2 x 16 + 8))
    chunked = step_cost(StepPlan(chunks=(PrefillChunk("f", 16, 8, False),)), {}, [], True, 0.02, 9.0)
    assert chunked.kind == "prefill" and chunked.fused and chunked.prefill_tokens == 8
    assert chunked.prefill_seq == math.sqrt(8 * 40)


def test_a_heartbeat_carries_a_uniform_sample_bounded_per_kind():
    sampler = StepSampler("w-1")
    for i in range(1000):
        sampler.note(step_cost(StepPlan(decode=("c",)), {}, [i], False, 0.01, float(i)))
    for i in range(3):
        sampler.note(step_cost(StepPlan(encode=("a",)), {"a": 9}, [], False, 0.02, float(i)))
    sample = sampler.drain()
    assert Counter(c.kind for c in sample) == {"decode": STEP_COSTS_PER_KIND, "prefill": 3}
    stamps = sorted(c.at for c in sample if c.kind == "decode")
    assert stamps[-1] > 100  # not just the first steps: drawn from all of them
    assert sampler.drain() == ()  # a new sample starts with each heartbeat


STEP_S, BOUNDARY_S = 0.02, 0.03  # an engine step, and the work of the boundary after it


class SlowEngine(FakeEngine):
    def step(self, *args, **kwargs):
        time.sleep(STEP_S)  # the step's own cost (on the engine thread)
        return super().step(*args, **kwargs)


@pytest.mark.usefixtures("cleanup")
async def test_a_steps_seconds_are_its_interval_in_the_loop_boundary_work_included(mesh_config, hub, monkeypatch):
    emit = Worker.emit

    async def slow_emit(self, plan, result):
        await asyncio.sleep(BOUNDARY_S)  # tokens sent slowly: boundary work the next step waits for
        await emit(self, plan, result)

    monkeypatch.setattr(Worker, "emit", slow_emit)
    schedule = Schedule("continuous", encode_batch=8, decode_batch=8)
    async with running_mesh(mesh_config, hub, SlowEngine, schedule=schedule) as m:
        worker = m.mesh.workers[0]
        noted = []
        note = worker.step_costs.note
        monkeypatch.setattr(worker.step_costs, "note", lambda cost: (noted.append(cost), note(cost)))
        body = {"model": m.model, "prompt": "steps", "max_tokens": 12, "ignore_eos": True}
        answers = await asyncio.gather(*(m.client.post("/v1/completions", json=body) for _ in range(4)))
        assert [a.status_code for a in answers] == [200] * 4
    decodes = [c.seconds for c in noted if c.kind == "decode"]
    assert len(decodes) >= 8
    assert min(c.seconds for c in noted) >= STEP_S * 0.9  # never less than the engine's step
    # steps that followed a step straight on carry the boundary before them too
    assert statistics.median(decodes) >= 0.9 * (STEP_S + BOUNDARY_S), decodes
