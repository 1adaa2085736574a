"""Mixed steps (Sarathi-style chunked prefill folded into decode steps): the policy through the
driver, with a pure executor that finishes each request after its output length."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer.driver import Driver, StepOutcome, kv_positions
from optimizer.policies import (
    RUNNABLE_POLICIES,
    ContinuousPolicy,
    MixedPolicy,
    PrefillChunk,
    PrefillingRequest,
    QueuedRequest,
    RunningRequest,
    WorkerState,
    make_policy,
)
from optimizer.schedule import POLICIES, Schedule
from tests.optimizer.test_driver import ForcedLengths


def _mixed(batch=4, chunk=16, encode=4) -> Schedule:
    return Schedule("mixed", encode_batch=encode, decode_batch=batch, chunk_tokens=chunk)


def test_a_long_prompt_is_cut_into_chunks_and_its_last_chunk_gives_its_first_token():
    policy = MixedPolicy(_mixed(batch=2, chunk=8))
    plan = policy.next_step(WorkerState((QueuedRequest("a", 20),), (RunningRequest("r", 5, 3),)))
    assert plan.decode == ("r",) and plan.chunks == (PrefillChunk("a", 0, 7, False),)
    plan = policy.next_step(WorkerState((), (RunningRequest("r", 5, 4),), (), None, (PrefillingRequest("a", 20, 7),)))
    assert plan.chunks == (PrefillChunk("a", 7, 7, False),)
    plan = policy.next_step(WorkerState((), (), (), None, (PrefillingRequest("a", 20, 14),)))
    assert plan.chunks == (PrefillChunk("a", 14, 6, True),) and plan.first_tokens == ("a",)


def test_short_prompts_share_a_step_within_the_budget_and_the_free_slots():
    policy = MixedPolicy(_mixed(batch=3, chunk=10))
    queued = tuple(QueuedRequest(f"q{i}", 4) for i in range(5))
    plan = policy.next_step(WorkerState(queued, (RunningRequest("r", 5, 1),)))
    assert [c.request_id for c in plan.chunks] == ["q0", "q1"]  # two free slots
    assert [c.length for c in plan.chunks] == [4, 4] and all(c.last for c in plan.chunks)
    assert plan.tokens == 9


def test_mixed_needs_room_for_prefill_beside_a_full_decode_batch():
    with pytest.raises(ValueError, match="chunk_tokens"):
        Schedule("mixed", decode_batch=64, chunk_tokens=64)
    Schedule("continuous", decode_batch=64, chunk_tokens=64)  # the field is mixed's alone


def test_every_policy_is_runnable_and_mixed_runs_in_workers():
    assert set(POLICIES) == RUNNABLE_POLICIES
    assert isinstance(make_policy(_mixed()), MixedPolicy)


def test_a_prefill_under_way_finishes_under_a_policy_that_does_not_chunk():
    d = Driver(MixedPolicy(_mixed(batch=2, chunk=8)))
    d.enqueue(QueuedRequest("a", 20))
    d.complete(d.plan(), StepOutcome())
    assert d.prefilling["a"].prefilled == 8
    d.switch(ContinuousPolicy(Schedule("continuous", encode_batch=2, decode_batch=2)))
    plan = d.plan()
    assert plan.chunks == (PrefillChunk("a", 8, 12, True),)
    d.complete(plan, StepOutcome())
    assert "a" in d.running and not d.prefilling


requests = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 12)), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(requests, st.integers(1, 6), st.integers(1, 40), st.integers(1, 4), st.sampled_from([None, 150, 400]))
def test_mixed_steps_finish_every_request_within_budgets(reqs, batch, extra, encode, kv_tokens):
    schedule = _mixed(batch=batch, chunk=batch + extra, encode=encode)
    driver = Driver(MixedPolicy(schedule), kv_tokens=kv_tokens)
    queued = [QueuedRequest(f"r{i}", n, max_len=n + o) for i, (n, o) in enumerate(reqs)]
    queued = [q for q in queued if driver.fits_alone(q)]
    for q in queued:
        driver.enqueue(q)
    executor = ForcedLengths({f"r{i}": o for i, (_, o) in enumerate(reqs)})
    prefilled = {q.request_id: 0 for q in queued}
    for _ in range(10_000):
        if driver.empty:
            break
        plan = driver.plan()
        assert not plan.idle
        assert plan.tokens <= schedule.chunk_tokens  # never over the token budget
        assert not set(plan.decode) & {c.request_id for c in plan.chunks}
        for c in plan.chunks:  # chunks continue where the last one stopped, end at the prompt's end
            q = next(x for x in queued if x.request_id == c.request_id)
            assert c.start == prefilled[c.request_id] and c.length >= 1
            prefilled[c.request_id] += c.length
            assert c.last == (prefilled[c.request_id] == q.input_len) and prefilled[c.request_id] <= q.input_len
        driver.complete(plan, executor.run(plan))
        held = [kv_positions(r) for r in (*driver.running.values(), *driver.prefilling.values())]
        assert len(held) <= schedule.decode_batch
        if kv_tokens is not None and held:
            assert len(held) * max(held) <= kv_tokens
    assert driver.empty  # every request completed
    assert all(executor.tokens[q.request_id] == executor.lengths[q.request_id] for q in queued)
