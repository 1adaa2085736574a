"""Roles for the live workers: deterministic, few moves, a fallback when WAA cannot run."""

import pytest

from optimizer.schedule import Schedule
from services.scheduler.allocation import allocate

WAA = Schedule("waa-c", encode_batch=4, num_devices=4, encoder_devices=1, decoder_devices=3, worker_devices=1)


def roles(allocation) -> dict[str, str]:
    return {a.worker_id: a.role for a in allocation.roles}


def test_single_pipeline_schedules_make_every_live_worker_a_worker():
    got = allocate(Schedule("rra", num_devices=3, worker_devices=1), ["c", "a", "b"], {})
    assert roles(got) == {"a": "worker", "b": "worker", "c": "worker"} and not got.fallback
    assert [a.worker_id for a in got.roles] == ["a", "b", "c"]  # the same order every time


def test_waa_splits_in_the_planned_proportion_with_at_least_one_of_each():
    assert sorted(roles(allocate(WAA, ["a", "b", "c", "d"], {})).values()) == ["decoder"] * 3 + ["encoder"]
    assert sorted(roles(allocate(WAA, ["a", "b"], {})).values()) == ["decoder", "encoder"]
    eight = roles(allocate(WAA, list("abcdefgh"), {}))
    assert list(eight.values()).count("encoder") == 2  # 1 of 4 planned: 2 of 8 live


def test_workers_keep_their_roles_when_others_come_and_go():
    before = roles(allocate(WAA, ["a", "b", "c", "d"], {}))
    encoder = next(w for w, r in before.items() if r == "encoder")
    after = roles(allocate(WAA, ["a", "b", "c", "d", "e"], before))
    assert after[encoder] == "encoder" and all(after[w] == r for w, r in before.items())
    shrunk = roles(allocate(WAA, [w for w in before if w != encoder], before))
    assert sorted(shrunk.values()) == ["decoder", "decoder", "encoder"]  # one decoder moved over


def test_the_same_inputs_give_the_same_roles():
    previous = {"a": "decoder", "b": "encoder", "c": "worker"}
    assert allocate(WAA, ["c", "b", "a", "x"], previous) == allocate(WAA, ["x", "a", "b", "c"], previous)


@pytest.mark.parametrize("live", [[], ["only"]])
def test_waa_without_two_workers_falls_back_to_continuous_batching(live):
    got = allocate(WAA, live, {})
    assert got.fallback and got.schedule.policy == "continuous" and got.schedule.decode_batch == WAA.decode_batch
    assert set(roles(got).values()) <= {"worker"}
