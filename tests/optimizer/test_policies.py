import pytest

from optimizer.policies import (
    ContinuousPolicy,
    Policy,
    QueuedRequest,
    RraPolicy,
    RunningRequest,
    StaticPolicy,
    StepPlan,
    WaaDecoderPolicy,
    WaaEncoderPolicy,
    WorkerState,
    make_policy,
)
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


def test_a_static_batch_holds_its_slots_until_its_last_member_finishes():
    policy = StaticPolicy(Schedule("static", encode_batch=3, decode_batch=3))
    assert policy.batch_slots == 0
    plan = policy.next_step(WorkerState(_queue(3)))
    policy.on_step_done(plan, ["q1"])
    assert policy.batch_slots == 3  # q1's slot is padding now, not room
    plan = policy.next_step(WorkerState((), _running("q0", "q2")))
    policy.on_step_done(plan, ["q0", "q2"])
    assert policy.batch_slots == 0


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


def _lens(*lengths):
    return tuple(QueuedRequest(f"q{i}", n) for i, n in enumerate(lengths))


def test_encode_batches_fill_to_the_expected_prompt_tokens():
    s = Schedule("rra", encode_batch=4, decode_batch=64, mean_input_len=10.0)
    policy = RraPolicy(s)
    assert policy.next_step(WorkerState(_lens(30, 5, 5, 5, 20))).encode == ("q0", "q1", "q2")  # ~40 tokens
    assert len(RraPolicy(s).next_step(WorkerState(_lens(*[2] * 20))).encode) == 8  # short: up to 2 x B_E
    assert RraPolicy(s).next_step(WorkerState(_lens(90, 1))).encode == ("q0",)  # long: at least one
    off = RraPolicy(Schedule("rra", encode_batch=4, decode_batch=64))
    assert len(off.next_step(WorkerState(_lens(*[2] * 20))).encode) == 4  # no expectation: plain B_E


def test_rra_nudges_its_encode_batch_when_the_decode_batch_drifts():
    s = Schedule(
        "rra", encode_batch=2, decode_batch=64, decode_iters_per_encode=1, mean_input_len=4.0, mean_decode_batch=10.0
    )
    small, large = RraPolicy(s), RraPolicy(s)
    queue = _lens(*[4] * 30)
    for policy, batch in ((small, 3), (large, 30)):
        for _ in range(5):  # decode steps far from the expected batch, each followed by an encode
            running = tuple(RunningRequest(f"r{i}", 4, 2) for i in range(batch))
            policy.on_step_done(StepPlan(decode=tuple(r.request_id for r in running)), [])
            policy.on_step_done(policy.next_step(WorkerState(queue, running)), [])
    assert small.fill.batch == 4 and large.fill.batch == 1  # 2 -> up to 2 x B_E, or down to 1


def test_a_worker_merges_left_over_hand_offs_into_free_slots():
    incoming = _running("h1", "h2", "h3")
    cont = ContinuousPolicy(Schedule("continuous", encode_batch=4, decode_batch=4))
    plan = cont.next_step(WorkerState(_queue(3), _running("a", "b"), incoming))
    assert plan.admit == ("h1", "h2") and plan.encode == () and plan.decode == ("a", "b", "h1", "h2")
    rra = RraPolicy(Schedule("rra", encode_batch=2, decode_batch=3, decode_iters_per_encode=5))
    rra.on_step_done(StepPlan(encode=("a",)), [])
    assert rra.next_step(WorkerState((), _running("a"), incoming)).admit == ("h1", "h2")
    static = StaticPolicy(Schedule("static", encode_batch=2, decode_batch=2))
    plan = static.next_step(WorkerState(_queue(3), (), incoming))
    assert plan.admit == ("h1", "h2") and plan.decode == ("h1", "h2") and not plan.encode


@pytest.mark.parametrize(
    ("schedule", "role"),
    [
        (Schedule("rra", encode_batch=2, decode_batch=4), "worker"),
        (Schedule("static", encode_batch=2, decode_batch=4), "worker"),
        (Schedule("continuous", encode_batch=2, decode_batch=4), "worker"),
        (Schedule("mixed", encode_batch=2, decode_batch=4), "worker"),
        (Schedule("waa-c", encode_batch=2, decode_batch=4, encoder_devices=1, decoder_devices=1), "encoder"),
        (Schedule("waa-c", encode_batch=2, decode_batch=4, encoder_devices=1, decoder_devices=1), "decoder"),
        (Schedule("continuous"), "idle"),
    ],
)
def test_every_policy_declares_what_its_driver_and_worker_read(schedule, role):
    policy = make_policy(schedule, role)
    assert isinstance(policy, Policy)
    assert isinstance(policy.keeps_kv, bool) and isinstance(policy.chunked, bool)
    assert policy.batch_slots == 0  # between batches (before any step), no policy holds slots
    # what differs from the defaults is what each policy is: chunked prefill plans its own
    # chunks, a WAA encoder's cache keeps prompts only
    assert policy.chunked == (schedule.policy == "mixed")
    assert policy.keeps_kv == (role != "encoder")
