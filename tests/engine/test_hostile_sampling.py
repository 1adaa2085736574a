"""Hostile sampling parameters beside normal requests: a request the engine cannot sample is
refused by name and changes nothing; one it can (extreme but valid values) runs; a step that
fails after its forward pass is undone. The normal requests' texts are those of solo runs."""

from __future__ import annotations

import math
import random

import pytest
import torch

import engine.engine as engine_module
from engine.api import (
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TOP_K,
    SEED_RANGE,
    GenerationRequest,
    PromptChunk,
    RequestRejected,
    SamplingParams,
)
from tests.engine.conftest import Collector, run_to_end
from tests.engine.test_step import assert_same_state, snapshot

# Values no check lets through; each is forced into parameters that were valid when built, as
# a message that got past every earlier check would carry them.
FORGED = [
    ("top_k", 2**63),
    ("top_k", 2**64),
    ("top_k", -1),
    ("top_k", 1.5),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", -math.inf),
    ("temperature", -1.0),
    ("top_p", math.nan),
    ("top_p", 0.0),
    ("top_p", 2.0),
    ("presence_penalty", math.inf),
    ("frequency_penalty", math.nan),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("logprobs", MAX_LOGPROBS + 1),
    ("min_tokens", -1),
    ("seed", SEED_RANGE[1] + 1),
    ("temperature", "1"),
    ("stop", ("x" * (MAX_STOP_CHARS + 1),)),
    ("stop", ("s",) * (MAX_STOPS + 1)),
    ("stop", ["a list"]),
]
# Extreme values that are valid: they must run, and change no other request.
EXTREME = [
    dict(temperature=1e-30),
    dict(temperature=2.0, top_k=1),
    dict(temperature=1.5, top_k=MAX_TOP_K),
    dict(temperature=1.0, top_p=1e-12),
    dict(temperature=0.7, presence_penalty=2.0, frequency_penalty=-2.0),
    dict(temperature=1.0, seed=SEED_RANGE[1]),
    dict(temperature=1.0, seed=SEED_RANGE[0], top_p=0.5),
    dict(temperature=2.0, logprobs=MAX_LOGPROBS),
    dict(min_tokens=10**9),
]


def prompt(rnd: random.Random) -> tuple[int, ...]:
    return tuple(rnd.randrange(256) for _ in range(rnd.randint(1, 20)))


def forged(rid: str, prompt_ids: tuple[int, ...], field: str, value: object) -> GenerationRequest:
    params = SamplingParams(max_tokens=6, temperature=1.0)
    object.__setattr__(params, field, value)  # bypasses the checks of SamplingParams itself
    return GenerationRequest(rid, prompt_ids, params)


def state_of(engine) -> dict[str, tuple]:
    return {rid: snapshot(engine, rid) for rid in engine.running()}


def assert_unchanged(engine, before: dict[str, tuple]) -> None:
    assert sorted(engine.running()) == sorted(before)
    for rid, state in before.items():
        assert_same_state(snapshot(engine, rid), state)


def test_forged_parameters_are_refused_by_name_and_leave_the_batch_as_it_was(llama):
    llama.prefill([GenerationRequest("ok", (5, 6, 7), SamplingParams(max_tokens=20, temperature=0.8, seed=1))])
    before = state_of(llama)
    for field, value in FORGED:
        bad = forged(f"bad-{field}", (1, 2, 3), field, value)
        with pytest.raises(RequestRejected) as refused:
            llama.step([GenerationRequest("fine", (9, 9)), bad], ["ok"])
        assert refused.value.request_id == bad.request_id and field in str(refused.value)
        assert_unchanged(llama, before)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_a_step_failing_after_its_forward_pass_is_undone(make_engine, monkeypatch, name):
    """A sampler that raises once: the step leaves every running request's cache, tokens and
    sampler as they were, the new request never joined, and everyone's text is that of a solo
    run once the step is taken again."""
    rnd, llama = random.Random(5), make_engine(name)
    requests = [
        GenerationRequest(
            f"r{i}",
            prompt(rnd),
            SamplingParams(max_tokens=10, ignore_eos=True, **({"temperature": 0.9, "seed": i} if i % 2 else {})),
        )
        for i in range(5)
    ]
    solo = {r.request_id: run_to_end(llama, [r]) for r in requests}
    out = Collector()
    out.add(llama.prefill(requests[:3]))
    out.add(llama.decode_step())
    before = state_of(llama)
    real, calls = engine_module.sample, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("sampler fault")
        return real(*args)

    monkeypatch.setattr(engine_module, "sample", failing)
    with pytest.raises(RuntimeError, match="sampler fault"):
        llama.step(requests[3:], llama.running())
    assert_unchanged(llama, before)
    out.add(llama.step(requests[3:], llama.running()))
    while llama.running():
        out.add(llama.decode_step())
    assert out.text == {rid: c.text[rid] for rid, c in solo.items()}
    assert out.tokens == {rid: c.tokens[rid] for rid, c in solo.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_steps_with_hostile_requests_give_normal_requests_their_solo_texts(llama, seed):
    """Random steps: normal greedy requests join beside forged and extreme ones, a random subset
    of the running ones decodes. Every forged request is refused by name (the step then runs
    without it); every extreme one finishes with tokens of the vocabulary; 0 normal requests
    get another text than alone."""
    rnd = random.Random(seed)
    normal = [GenerationRequest(f"n{i}", prompt(rnd), SamplingParams(max_tokens=rnd.randint(1, 10))) for i in range(10)]
    solo = {r.request_id: run_to_end(llama, [r]) for r in normal}
    hostile = [forged(f"f{i}", prompt(rnd), *FORGED[i]) for i in range(len(FORGED))]
    hostile += [
        GenerationRequest(f"x{i}", prompt(rnd), SamplingParams(max_tokens=rnd.randint(1, 8), **kw))
        for i, kw in enumerate(EXTREME)
    ]
    pending = normal + hostile
    rnd.shuffle(pending)
    out, refused = Collector(), set()
    while pending or llama.running():
        take = rnd.choice([0, 1, 2, 4])
        joining, pending = pending[:take], pending[take:]
        running = llama.running()
        decode = rnd.sample(running, rnd.randint(1 if running and not joining else 0, len(running)))
        while True:
            before = state_of(llama)
            try:
                out.add(llama.step(joining, decode))
                break
            except RequestRejected as exc:
                assert exc.request_id.startswith("f"), exc
                assert_unchanged(llama, before)
                refused.add(exc.request_id)
                joining = [r for r in joining if r.request_id != exc.request_id]
    assert refused == {r.request_id for r in hostile if r.request_id.startswith("f")}
    wrong = [rid for rid in solo if (out.text[rid], out.tokens[rid]) != (solo[rid].text[rid], solo[rid].tokens[rid])]
    assert wrong == []
    for r in hostile:
        if r.request_id.startswith("x"):
            assert r.request_id in out.reason and all(0 <= t < llama.vocab_size for t in out.tokens[r.request_id])


def test_a_worker_step_refuses_only_the_hostile_request_and_names_its_field(llama):
    """The worker's executor: the hostile request is refused (its client gets the reason), the
    other new request and the running one advance as they would without it."""
    from optimizer.policies import StepPlan
    from services.worker.executor import run_step

    good, other = (
        GenerationRequest("good", (4, 5, 6), SamplingParams(max_tokens=8)),
        GenerationRequest("other", (7, 8), SamplingParams(max_tokens=8)),
    )
    solo = {r.request_id: run_to_end(llama, [r]) for r in (good, other)}
    bad = forged("bad", (1, 2, 3), "top_k", 2**63)
    out = Collector()
    out.add(llama.prefill([good]))
    result = run_step(
        llama, StepPlan(encode=("bad", "other"), decode=("good",)), {"bad": bad, "other": other}, {}, export=None
    )
    assert list(result.refused) == ["bad"] and "top_k" in result.refused["bad"]
    assert not result.failed and not result.given_back
    out.add(result.events)
    while llama.running():
        out.add(llama.decode_step())
    assert {rid: out.text[rid] for rid in solo} == {rid: c.text[rid] for rid, c in solo.items()}


def test_a_failed_step_with_prompt_chunks_is_undone(llama, monkeypatch):
    """A chunked prefill's next chunk and a new first chunk in a step that fails: the first
    request keeps the part it had, the second never got a slot, and both end as whole prefills."""
    rnd = random.Random(7)
    a, b = (
        GenerationRequest(rid, tuple(rnd.randrange(256) for _ in range(30)), SamplingParams(max_tokens=6))
        for rid in ("a", "b")
    )
    solo = {r.request_id: run_to_end(llama, [r]) for r in (a, b)}
    out = Collector()
    out.add(llama.step(chunks=[PromptChunk(a, 0, 10)]))
    kv_before = llama.runner.export(0)

    def fault(*_):
        raise RuntimeError("sampler fault")

    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "sample", fault)
        with pytest.raises(RuntimeError, match="sampler fault"):
            llama.step(chunks=[PromptChunk(a, 10, 20), PromptChunk(b, 0, 12)])
    assert len(llama._slots) == 1 and llama._slots[0].pending == 20
    assert llama.runner.cache.lengths == [10] and torch.equal(llama.runner.export(0), kv_before)
    out.add(llama.step(chunks=[PromptChunk(a, 10, 20), PromptChunk(b, 0, 12)]))
    out.add(llama.step(chunks=[PromptChunk(b, 12, 18)], decode=["a"]))
    while llama.running():
        out.add(llama.decode_step())
    assert {rid: out.tokens[rid] for rid in solo} == {rid: c.tokens[rid] for rid, c in solo.items()}
