"""The driver: the bookkeeping around the policy that simulator and workers share."""

import pytest

from optimizer.driver import Driver, StepOutcome
from optimizer.policies import (
    ContinuousPolicy,
    DrainPolicy,
    QueuedRequest,
    RraPolicy,
    RunningRequest,
    StaticPolicy,
    StepPlan,
    WaaDecoderPolicy,
)
from optimizer.schedule import Schedule
from optimizer.simulator import SimRequest, replay


class ForcedLengths:
    """An executor whose requests finish after a fixed number of tokens (forced lengths); a
    prefill's first token comes with the request's encode or its last chunk."""

    def __init__(self, lengths: dict[str, int]) -> None:
        self.lengths, self.tokens = lengths, {}

    def run(self, plan: StepPlan) -> StepOutcome:
        done = []
        for rid in (*plan.first_tokens, *plan.decode):
            self.tokens[rid] = self.tokens.get(rid, 0) + 1
            if self.tokens[rid] == self.lengths[rid]:
                done.append(rid)
        return StepOutcome(tuple(done))


def test_complete_moves_requests_through_their_states():
    d = Driver(ContinuousPolicy(Schedule("continuous", encode_batch=2, decode_batch=4)))
    for i in range(3):
        d.enqueue(QueuedRequest(f"q{i}", 10 + i))
    d.offer(RunningRequest("h", 7, 5))
    plan = d.plan()
    assert plan.admit == ("h",) and plan.encode == ("q0", "q1") and plan.decode == ("h",)
    d.complete(plan, StepOutcome(finished=("q1",)))
    assert list(d.queued) == ["q2"] and not d.incoming
    assert d.running == {"h": RunningRequest("h", 7, 6), "q0": RunningRequest("q0", 10, 1)}
    d.complete(StepPlan(decode=("h", "q0")), StepOutcome(departed=("q0",)))
    assert list(d.running) == ["h"] and d.running["h"].generated == 7


def test_remove_forgets_a_request_wherever_it_is():
    d = Driver(RraPolicy(Schedule("rra")))
    d.enqueue(QueuedRequest("a", 3))
    d.offer(RunningRequest("b", 3, 1))
    assert d.remove("a") and d.remove("b") and not d.remove("c") and d.empty


@pytest.mark.parametrize("policy", ["rra", "static", "continuous"])
def test_every_request_finishes_with_its_tokens(policy):
    d = Driver(
        {"rra": RraPolicy, "static": StaticPolicy, "continuous": ContinuousPolicy}[policy](
            Schedule(policy, encode_batch=3, decode_batch=5, decode_iters_per_encode=2)
        )
    )
    lengths = {f"r{i}": 1 + i % 7 for i in range(20)}
    for rid in lengths:
        d.enqueue(QueuedRequest(rid, 4))
    executor = ForcedLengths(lengths)
    while not d.empty:
        assert not d.step(executor).idle
    assert executor.tokens == lengths


def test_a_new_policy_adopts_the_running_batch():
    d = Driver(ContinuousPolicy(Schedule("continuous", encode_batch=4, decode_batch=4)))
    for i in range(4):
        d.enqueue(QueuedRequest(f"q{i}", 4))
    d.complete(d.plan(), StepOutcome())
    d.switch(StaticPolicy(Schedule("static", encode_batch=2, decode_batch=2)))
    d.enqueue(QueuedRequest("late", 4))
    plan = d.plan()  # the static batch in progress is the one it found, not a new one
    assert plan.decode == ("q0", "q1", "q2", "q3") and not plan.encode and plan.padding == 0
    d.switch(DrainPolicy(d.policy.schedule))
    assert d.plan() == StepPlan(decode=("q0", "q1", "q2", "q3"))


def test_a_decoder_merges_hand_offs_only_into_free_slots():
    d = Driver(WaaDecoderPolicy(Schedule("waa-c", decode_batch=2, encoder_devices=1, decoder_devices=1)))
    for i in range(3):
        d.offer(RunningRequest(f"h{i}", 5, 1))
    plan = d.plan()
    assert plan.admit == ("h0", "h1") and list(d.incoming) == ["h0", "h1", "h2"]
    d.complete(plan, StepOutcome(finished=("h0",)))
    assert d.plan().admit == ("h2",)


def test_replay_gives_the_plans_of_a_recorded_time_line():
    """Arrivals at recorded boundaries and recorded step lengths: the same plans every time, and
    requests that arrive during a step are seen at the next boundary, not before."""
    schedule = Schedule("rra", encode_batch=2, decode_batch=4, decode_iters_per_encode=2)
    requests = [
        SimRequest("a", 5, 3, 0.0),
        SimRequest("b", 5, 2, 0.0),
        SimRequest("c", 5, 2, 0.15),
        SimRequest("d", 5, 1, 2.0),
    ]
    durations = [0.1] * 5 + [0.2]
    plans = replay(schedule, requests, durations)
    assert plans == [
        StepPlan(encode=("a", "b")),
        StepPlan(decode=("a", "b")),
        StepPlan(decode=("a",)),
        StepPlan(encode=("c",)),
        StepPlan(decode=("c",)),
        StepPlan(encode=("d",)),
    ]
    assert replay(schedule, requests, durations) == plans
