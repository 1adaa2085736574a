"""The driver's KV-cache gate: a step admits or encodes a request only while the dense cache
(requests x the longest one's positions, each counted at prompt + max_tokens) fits the budget."""

import random

import pytest

from optimizer.driver import Driver, StepOutcome, kv_positions
from optimizer.policies import (
    ContinuousPolicy,
    QueuedRequest,
    RraPolicy,
    RunningRequest,
    StaticPolicy,
    StepPlan,
    WaaDecoderPolicy,
    WaaEncoderPolicy,
)
from optimizer.schedule import Schedule

CONTINUOUS = Schedule("continuous", encode_batch=8, decode_batch=16)
WAA = Schedule("waa-c", num_devices=2, encode_batch=8, decode_batch=16, encoder_devices=1, decoder_devices=1)


def test_encode_takes_only_what_fits() -> None:
    d = Driver(ContinuousPolicy(CONTINUOUS), kv_tokens=100)
    for i in range(5):
        d.enqueue(QueuedRequest(f"q{i}", 10, max_len=30))
    plan = d.plan()
    assert plan.encode == ("q0", "q1", "q2")  # 3 x 30 = 90 fits, 4 x 30 = 120 does not
    d.complete(plan, StepOutcome())
    assert d.plan().encode == ()  # full until one finishes
    d.complete(StepPlan(decode=("q0", "q1", "q2")), StepOutcome(finished=("q0",)))
    assert d.plan().encode == ("q3",)


def test_a_long_request_waits_instead_of_being_passed_over() -> None:
    """FIFO: the first request that does not fit stops the rest, so a long one is not starved by
    short ones arriving behind it."""
    d = Driver(ContinuousPolicy(CONTINUOUS), kv_tokens=100)
    d.offer(RunningRequest("r", 10, 1, max_len=20))
    d.complete(d.plan(), StepOutcome())  # r runs
    d.enqueue(QueuedRequest("long", 40, max_len=90))
    d.enqueue(QueuedRequest("short", 5, max_len=10))
    plan = d.plan()
    assert plan.encode == () and plan.decode == ("r",)  # 2 x 90 > 100: long waits, short behind it too
    d.complete(plan, StepOutcome(finished=("r",)))
    assert d.plan().encode == ("long",)  # alone it fits; short (2 x 90) still waits


def test_handed_off_requests_stay_incoming_until_they_fit() -> None:
    d = Driver(WaaDecoderPolicy(WAA), kv_tokens=100)
    for i in range(3):
        d.offer(RunningRequest(f"h{i}", 20, 1, max_len=40))
    plan = d.plan()
    assert plan.admit == ("h0", "h1") and plan.decode == ("h0", "h1")
    d.complete(plan, StepOutcome())
    assert list(d.incoming) == ["h2"]


def test_an_encoder_counts_prompts_only() -> None:
    """What a WAA encoder prefills leaves with the hand-off: its cache holds prompts."""
    d = Driver(WaaEncoderPolicy(WAA), kv_tokens=100)
    for i in range(4):
        d.enqueue(QueuedRequest(f"q{i}", 19, max_len=500))
    assert d.plan().encode == ("q0", "q1", "q2", "q3")  # 4 x (19 + 1) = 80
    assert d.fits_alone(QueuedRequest("big", 99, max_len=10_000))
    assert not d.fits_alone(QueuedRequest("huge", 100, max_len=10_000))


def test_fits_alone() -> None:
    d = Driver(RraPolicy(CONTINUOUS), kv_tokens=100)
    assert d.fits_alone(QueuedRequest("a", 10, max_len=100))
    assert not d.fits_alone(QueuedRequest("b", 10, max_len=101))
    assert not d.fits_alone(RunningRequest("c", 90, 20))  # unknown max_len: what it holds now
    assert Driver(RraPolicy(CONTINUOUS)).fits_alone(QueuedRequest("d", 10, max_len=10**9))


def test_kv_positions() -> None:
    assert kv_positions(QueuedRequest("q", 10, max_len=50)) == 50
    assert kv_positions(QueuedRequest("q", 10)) == 11
    assert kv_positions(RunningRequest("r", 10, 7, max_len=12)) == 17  # never below what it holds
    assert kv_positions(QueuedRequest("q", 10, max_len=50), keeps_kv=False) == 11


@pytest.mark.parametrize("policy", [ContinuousPolicy, RraPolicy, StaticPolicy])
def test_the_budget_holds_at_every_step_and_everything_finishes(policy) -> None:
    """Random lengths through a whole run: at each step the batch fits its budget, and every
    request that fits alone finishes."""
    rng = random.Random(7)
    budget = 400
    d = Driver(policy(CONTINUOUS), kv_tokens=budget)
    target: dict[str, int] = {}
    for i in range(60):
        prompt, output = rng.randint(1, 60), rng.randint(1, 80)
        d.enqueue(QueuedRequest(f"q{i}", prompt, max_len=prompt + output))
        target[f"q{i}"] = output
    produced: dict[str, int] = {}
    finished: set[str] = set()
    for _ in range(10_000):
        if d.empty:
            break
        plan = d.plan()
        assert not plan.idle
        done = []
        for rid in (*plan.encode, *plan.decode):
            produced[rid] = produced.get(rid, 0) + 1
            if produced[rid] == target[rid]:
                done.append(rid)
        d.complete(plan, StepOutcome(tuple(done)))
        finished.update(done)
        sizes = [kv_positions(r) for r in d.running.values()]
        assert not sizes or len(sizes) * max(sizes) <= budget
    assert finished == set(target)


def test_without_a_budget_plans_are_the_policys() -> None:
    rng = random.Random(3)
    for _ in range(50):
        free, gated = Driver(ContinuousPolicy(CONTINUOUS)), Driver(ContinuousPolicy(CONTINUOUS), kv_tokens=10**9)
        for i in range(rng.randint(0, 20)):
            request = QueuedRequest(f"q{i}", rng.randint(1, 50), max_len=rng.randint(50, 500))
            free.enqueue(request)
            gated.enqueue(request)
        assert free.plan() == gated.plan()
