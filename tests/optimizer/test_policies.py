import pytest

from optimizer.policies import (ContinuousPolicy, QueuedRequest, RraPolicy, RunningRequest, StaticPolicy,
                                WaaDecoderPolicy, WaaEncoderPolicy, WorkerState, make_policy)
from optimizer.schedule import Schedule


def _queue(n, start=0):
    return tuple(QueuedRequest(f"q{i}", 10) for i in range(start, start + n))


def _running(*ids):
    return tuple(RunningRequest(i, 10, 1) for i in ids)


def test_rra_encodes_then_decodes_n_d_times_then_encodes_again():
    policy = RraPolicy(Schedule("rra", encode_batch=2, decode_batch=8, decode_iters_per_encode=3))
    kinds = []
    running = ()
    for _ in range(8):
        plan = policy.next_step(WorkerState(_queue(5), running))
        kinds.append("E" if plan.encode else "D")
        running = running + _running(*plan.encode)
        policy.on_step_done(plan, [])
    assert "".join(kinds) == "EDDDEDDD"


def test_rra_refills_only_the_slots_that_finished():
    policy = RraPolicy(Schedule("rra", encode_batch=4, decode_batch=5, decode_iters_per_encode=1))
    plan = policy.next_step(WorkerState(_queue(9), _running("a", "b", "c")))
    assert plan.encode == ("q0", "q1")


def test_rra_with_nothing_to_do_is_idle():
    assert RraPolicy(Schedule("rra")).next_step(WorkerState()).idle


def test_static_batch_keeps_finished_slots_and_admits_nobody_until_it_ends():
    policy = StaticPolicy(Schedule("static", encode_batch=3, decode_batch=3))
    plan = policy.next_step(WorkerState(_queue(5)))
    assert plan.encode == ("q0", "q1", "q2")
    policy.on_step_done(plan, ["q1"])
    plan = policy.next_step(WorkerState(_queue(2, 3), _running("q0", "q2")))
    assert plan.encode == () and plan.decode == ("q0", "q2") and plan.padding == 1
    policy.on_step_done(plan, ["q0", "q2"])
    assert policy.next_step(WorkerState(_queue(2, 3))).encode == ("q3", "q4")


def test_continuous_admits_into_free_slots_in_the_same_iteration():
    policy = ContinuousPolicy(Schedule("continuous", encode_batch=8, decode_batch=4))
    plan = policy.next_step(WorkerState(_queue(5), _running("a")))
    assert plan.encode == ("q0", "q1", "q2") and plan.decode == ("a",)


def test_waa_encoder_respects_the_decoders_free_slots():
    policy = WaaEncoderPolicy(Schedule("waa-c", encode_batch=4, encoder_devices=1))
    assert policy.next_step(WorkerState(_queue(9), downstream_free=2)).encode == ("q0", "q1")
    assert policy.next_step(WorkerState(_queue(9), downstream_free=0)).idle
    assert len(policy.next_step(WorkerState(_queue(9))).encode) == 4


def test_waa_decoder_merges_hand_offs_up_to_its_batch():
    policy = WaaDecoderPolicy(Schedule("waa-m", decode_batch=3))
    plan = policy.next_step(WorkerState(running=_running("a"), incoming=_running("x", "y", "z")))
    assert plan.admit == ("x", "y") and plan.decode == ("a", "x", "y")


@pytest.mark.parametrize("policy, role", [("rra", "encoder"), ("waa-c", "worker"), ("static", "decoder")])
def test_roles_that_a_policy_lacks_are_refused(policy, role):
    with pytest.raises(ValueError):
        make_policy(Schedule(policy), role)


def test_make_policy_gives_each_role_its_object():
    assert isinstance(make_policy(Schedule("waa-c"), "encoder"), WaaEncoderPolicy)
    assert isinstance(make_policy(Schedule("waa-m"), "decoder"), WaaDecoderPolicy)
    assert isinstance(make_policy(Schedule("continuous")), ContinuousPolicy)


@pytest.mark.parametrize("kwargs", [dict(policy="fcfs"), dict(encode_batch=0), dict(tp_stages=-1)])
def test_bad_schedules_rejected(kwargs):
    with pytest.raises(ValueError):
        Schedule(**kwargs)
