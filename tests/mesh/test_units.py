"""Pure pieces: codec, names, config, lifecycle, schedule following, per-request event ordering."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import pytest
from pydantic import ValidationError

from common.config import MeshConfig
from common.lifecycle import Stage, Timeline
from common.messages import codec
from common.messages.control import Abort, PinSchedule, RoleAssignment, ScheduleUpdate
from common.messages.events import EventBatch, Failure, Stamp, Token
from common.messages.handoff import KvReady
from common.messages.schedule import ScheduleSpec
from common.messages.status import LengthSample, WorkerStatus
from common.messages.work import EncodeWork, Sampling
from common.names import Names
from optimizer.schedule import Schedule
from services.front.core import Pending, RequestFailed
from services.schedules import planned
from services.worker.follower import ScheduleFollower
from services.worker.mailbox import Outbox

EXAMPLES = [
    EncodeWork("r1", "m", (1, 2, 3), Sampling(4, 0.5, 3, 0.9, 7, ("\n", "END"), True), "q", 1.5),
    KvReady("r1", "enc-1", "q", "ns:kv:r1", 3, 2, 1.5),
    EventBatch(
        "dec-1",
        "decoder",
        3,
        2,
        (Token("r1", 0, 5, "x", False), Token("r1", 1, 6, "", True, "stop")),
        (Stamp("r1", Stage.DECODE_START, 2.0),),
        (Failure("r2", 400, "too long"),),
    ),
    ScheduleUpdate(
        4,
        ScheduleSpec(
            policy="waa-m",
            encode_batch=3,
            num_devices=2,
            encoder_devices=1,
            decoder_devices=1,
            worker_devices=1,
            mean_input_len=12.5,
        ),
        (RoleAssignment("w1", "encoder"), RoleAssignment("w2", "decoder")),
        9.0,
    ),
    Abort("r9"),
    PinSchedule(ScheduleSpec(policy="rra"), 1.0),
    PinSchedule(None, 1.0),
    WorkerStatus("w1", "encoder", 4, 0, 0, "applied", 3.0),
    LengthSample("r1", 3, 7, "length", 4.0),
    LengthSample("r1", 3, 7, "length", 4.0, 1.0, 2.0, 2.5, 4, "w2"),
    EncodeWork("r1", "m", (1, 2), Sampling(9), "q", 1.5, False, (5, 6), "ab"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    assert codec.decode(codec.encode(message)) == message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([2, 1]),
        msgpack.packb([1, 999]),
        msgpack.packb({"type": "x"}),
        msgpack.packb([1, 5, 3]),  # Abort with an int id
        msgpack.packb([1, 5]),  # Abort without fields
        msgpack.packb([1, 101, 1, 0.0, 0, 1.0, None, [], False]),  # a nested-only struct at top level
        msgpack.packb([1, 5, "r"]),  # schema 1: older than this mesh
    ],
)
def test_garbage_raises_decode_error(data):
    with pytest.raises(codec.DecodeError):
        codec.decode(data, ScheduleUpdate | Abort | EncodeWork)


def test_decode_refuses_a_message_of_another_direction():
    with pytest.raises(codec.DecodeError):
        codec.decode(codec.encode(Abort("r")), EncodeWork)


def test_values_out_of_range_are_rejected_at_the_boundary():
    fields = [1, 1, 1, 1, 1, 0, 1, 0, 1, 0, 0.0, 0.0, 1, -1, 512]
    good = msgpack.packb([codec.SCHEMA_VERSION, 4, 1, ["rra", 1, *fields[1:]], [], 0.0, 0, 0, 1e18])
    assert codec.decode(good, ScheduleUpdate).schedule.encode_batch == 1  # only the field below is wrong
    wrong_type = msgpack.packb([codec.SCHEMA_VERSION, 4, 1, ["rra", "1", *fields[1:]], [], 0.0, 0, 0, 1e18])
    with pytest.raises(codec.DecodeError):
        codec.decode(wrong_type, ScheduleUpdate)  # never reaches a worker's follower
    for policy, batch in (("nope", 1), ("rra", 0)):  # unknown, out of range: the planner's rules refuse them
        bad = msgpack.packb([codec.SCHEMA_VERSION, 4, 1, [policy, batch, *fields[1:]], [], 0.0, 0, 0, 1e18])
        with pytest.raises(ValueError, match="policy" if policy == "nope" else "encode_batch"):
            planned(codec.decode(bad, ScheduleUpdate).schedule)  # what a follower does before taking it
    sample = codec.decode(msgpack.packb([codec.SCHEMA_VERSION, 7, "r", 1, 2, "stop", 3, 0, 0, 0, 0, ""]))
    assert sample.finished_at == 3.0  # int -> float


def test_names_are_namespaced_and_distinct():
    a, b = Names("one"), Names("two")
    fields = [n for n in dir(Names) if isinstance(getattr(Names, n), property)]
    values = [getattr(a, n) for n in fields]
    assert len(set(values)) == len(values)
    assert all(v.startswith("one") for v in values)
    assert a.kv_payload("r") != b.kv_payload("r") and a.encode_queue != b.encode_queue


def test_config_validates_and_reads_the_environment(monkeypatch):
    monkeypatch.setenv("EXEGPT_NAMESPACE", "from-env")
    monkeypatch.setenv("EXEGPT_MAX_DECODE_BATCH", "7")
    config = MeshConfig()
    assert (config.namespace, config.max_decode_batch, config.distributed) == ("from-env", 7, False)
    assert MeshConfig(namespace="flag").namespace == "flag"
    with pytest.raises(ValidationError, match="namespace"):
        MeshConfig(namespace="has space")
    with pytest.raises(ValidationError):
        MeshConfig(max_encode_batch=0)


def test_timeline_derives_latencies():
    t = Timeline()
    for stage, at in ((Stage.ARRIVED, 10.0), (Stage.FIRST_TOKEN, 10.5), (Stage.FINISHED, 12.5)):
        t.mark(stage, at)
    t.mark(Stage.ARRIVED, 99.0)  # a repeated stage keeps its first stamp
    t.output_tokens = 5
    assert (t.ttft_s, t.e2e_s, t.tpot_s) == (0.5, 2.5, 0.5)


def test_schedule_follower_applies_only_newer_versions_at_the_boundary():
    follower = ScheduleFollower("w1", max_encode_batch=64, max_decode_batch=16)
    v2 = ScheduleUpdate(2, ScheduleSpec(encode_batch=2, decode_batch=100), (), 0.0)
    assert follower.offer(v2) and follower.version == 0  # not before the boundary
    assert not follower.offer(ScheduleUpdate(1, ScheduleSpec(), (), 0.0))
    assert follower.take() is v2 and (follower.version, follower.schedule.encode_batch) == (2, 2)
    assert follower.schedule.decode_batch == 16  # the worker's memory guard caps B_D
    assert follower.capped() == "B_D 100 -> 16"
    assert follower.take() is None
    follower.offer(ScheduleUpdate(3, ScheduleSpec(encode_batch=2, decode_batch=8), (), 0.0))
    follower.take()
    assert follower.capped() is None


def test_schedule_follower_keeps_the_schedule_in_force_when_an_update_is_not_one_it_can_run():
    follower = ScheduleFollower("w1", 64, 16)
    assert not follower.offer(ScheduleUpdate(2, ScheduleSpec("fcfs"), (), 0.0, lease_until=1e12))
    assert not follower.offer(ScheduleUpdate(3, ScheduleSpec(encode_batch=0), (), 0.0, lease_until=1e12))
    assert follower.rejected["invalid"] == 2 and follower.take() is None
    assert (follower.version, follower.schedule.policy) == (0, "continuous")
    assert follower.offer(ScheduleUpdate(4, ScheduleSpec("rra"), (), 0.0, lease_until=1e12))
    assert follower.take().version == 4 and follower.schedule.policy == "rra"


def fenced(version: int, epoch: int, token: int, lease_until: float = 100.0) -> ScheduleUpdate:
    return ScheduleUpdate(version, ScheduleSpec(), (), 0.0, epoch=epoch, token=token, lease_until=lease_until)


def test_schedule_follower_fences_out_a_deposed_leader():
    """Ordered by (epoch, version); below the highest (epoch, token) seen, or after its lease
    (by the worker's clock), an update is rejected and counted."""
    now = [50.0]
    follower = ScheduleFollower("w1", 64, 16, clock=lambda: now[0])
    assert follower.offer(fenced(10, epoch=1, token=2))
    assert not follower.offer(fenced(11, epoch=1, token=1))  # the old leader, after the new one spoke
    assert follower.rejected == {"fenced": 1, "late": 0, "invalid": 0}
    assert not follower.offer(fenced(12, epoch=1, token=2, lease_until=50.0))  # arrived as its lease ended
    assert follower.rejected == {"fenced": 1, "late": 1, "invalid": 0} and follower.rejections == 2
    assert not follower.offer(fenced(9, epoch=1, token=2))  # old news: dropped, not a rejection
    assert follower.rejections == 2
    assert follower.offer(fenced(11, epoch=1, token=3))  # the next term's versions follow on
    assert follower.take().version == 11 and follower.take() is None


def test_schedule_follower_follows_a_fresh_store_and_trusts_what_it_stored():
    now = [50.0]
    follower = ScheduleFollower("w1", 64, 16, clock=lambda: now[0])
    assert follower.offer(fenced(57, epoch=1000, token=4))
    follower.take()
    assert follower.offer(fenced(1, epoch=2000, token=1))  # Redis restarted empty: a later epoch
    assert follower.take().version == 1
    assert not follower.offer(fenced(58, epoch=1000, token=4))  # the old store's leader is fenced out
    late = ScheduleFollower("w2", 64, 16, clock=lambda: now[0])
    assert late.offer(fenced(2, epoch=2000, token=1, lease_until=10.0), stored=True)  # written under the lease
    assert not late.offer(fenced(3, epoch=2000, token=1, lease_until=10.0))  # the same, broadcast late
    assert late.rejected == {"fenced": 0, "late": 1, "invalid": 0}


@pytest.mark.parametrize(
    "schedule, allocation, role",
    [
        (ScheduleSpec("rra"), (), "worker"),  # any worker runs a single-pipeline schedule
        (ScheduleSpec("waa-c", encoder_devices=1, decoder_devices=1, num_devices=2), (), "idle"),  # waits for a role
        (
            ScheduleSpec("waa-c", encoder_devices=1, decoder_devices=1, num_devices=2),
            (RoleAssignment("w1", "decoder"),),
            "decoder",
        ),
    ],
)
def test_a_worker_takes_its_role_from_the_allocation(schedule, allocation, role):
    follower = ScheduleFollower("w1", 64, 256)
    follower.offer(ScheduleUpdate(1, schedule, allocation, 0.0))
    follower.take()
    assert follower.role == role


def tok(i: int, finished: bool = False) -> Token:
    return Token("r", i, 100 + i, str(i), finished, "length" if finished else None)


async def test_pending_keeps_each_index_once_and_in_order():
    pending = Pending("r", 3)
    assert not pending.on_token(tok(1))  # early: held back
    assert not pending.on_token(tok(0))
    assert not pending.on_token(tok(0))  # redelivered duplicate
    assert pending.on_token(tok(2, finished=True))
    assert not pending.on_token(tok(2, finished=True))
    got = [t.index async for t in pending.tokens()]
    assert got == [0, 1, 2] and pending.timeline.output_tokens == 3


async def test_pending_reports_a_failure_once():
    pending = Pending("r", 3)
    assert pending.on_failure(Failure("r", 400, "bad"))
    assert not pending.on_failure(Failure("r", 500, "again"))
    with pytest.raises(Exception, match="bad"):
        async for _ in pending.tokens():
            pass


async def test_a_pending_request_answers_504_at_the_deadline_set_when_it_was_submitted():
    pending = Pending("r", 3, deadline=time.time() - 0.01, timeout_s=5)
    pending.on_token(tok(0))
    got = []
    with pytest.raises(RequestFailed) as failed:
        async for token in pending.tokens():
            got.append(token.index)
    assert got == [0]  # what came before the deadline is given; then nothing more is waited for
    assert failed.value.status == 504 and str(failed.value) == "no result within 5 s"


def test_outbox_groups_events_per_submitter():
    box = Outbox()
    box.token("q1", tok(0))
    box.token("q2", tok(0))
    box.stamp("q1", "r", Stage.ENCODE_END, 1.0)
    batches = box.batches("enc", "encoder", 3, 2)
    assert set(batches) == {"q1", "q2"}
    assert batches["q1"].stamps == (Stamp("r", Stage.ENCODE_END, 1.0),)
    assert dataclasses.replace(batches["q2"], tokens=()) == EventBatch("enc", "encoder", 3, 2)


def test_a_schedule_to_pin_reads_from_json_a_file_or_plan_output(tmp_path):
    import json

    from services.schedules import parse_schedule

    fields = {"policy": "rra", "encode_batch": 5, "decode_iters_per_encode": 3, "worker_devices": 1}
    assert parse_schedule(json.dumps(fields)) == Schedule(**fields)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schedule": fields, "predicted": {"throughput_seq_s": 1.0}}))
    assert parse_schedule(str(plan)) == Schedule(**fields)  # exegpt plan --json > plan.json
    for bad in ('{"policy": "fcfs"}', '{"encode_batch": 0}', '{"nope": 1}', "{not json"):
        with pytest.raises(ValueError, match="not a schedule"):
            parse_schedule(bad)


# --- an idle worker's inbox gathers a burst -----------------------------------------------------


async def test_an_idle_inbox_gathers_a_burst_until_a_gap():
    import asyncio

    from services.worker.mailbox import Inbox

    inbox, loop = Inbox(), asyncio.get_running_loop()
    inbox.put(("q", "first"))
    loop.call_later(0.001, inbox.put, ("q", "second"))
    loop.call_later(0.002, inbox.put, ("q", "third"))
    await inbox.settle(gap_s=0.2, limit_s=30.0)
    assert [body for _, body in inbox.take()] == ["first", "second", "third"]


async def test_settling_ends_at_a_wake_up_at_its_limit_and_when_off():
    import asyncio
    import time

    from services.worker.mailbox import Inbox

    inbox, loop = Inbox(), asyncio.get_running_loop()
    inbox.put(("q", "first"))
    loop.call_later(0.001, inbox.wake)  # a stop or a new schedule: no waiting for more
    started = time.monotonic()
    await inbox.settle(gap_s=30.0, limit_s=30.0)
    assert time.monotonic() - started < 10 and inbox.waiting()

    stop = asyncio.Event()

    async def stream() -> None:  # arrivals that never pause
        while not stop.is_set():
            inbox.put(("q", "more"))
            await asyncio.sleep(0.001)

    feeding = asyncio.create_task(stream())
    started = time.monotonic()
    await inbox.settle(gap_s=1.0, limit_s=0.05)
    assert time.monotonic() - started < 10  # the limit, not the gap, ended it
    stop.set()
    await feeding

    empty = Inbox()
    await empty.settle(gap_s=30.0, limit_s=30.0)  # nothing arrived: nothing to gather
    inbox.put(("q", "x"))
    await inbox.settle(gap_s=0.0, limit_s=30.0)  # gathering off


def test_up_shares_the_host_cores_between_the_engine_processes_it_starts():
    from services.run.launcher import with_worker_threads

    assert with_worker_threads(MeshConfig(), 2, cores=16).threads == 8
    assert with_worker_threads(MeshConfig(tp="2"), 2, cores=16).threads == 4  # 2 groups of 2 processes
    assert with_worker_threads(MeshConfig(), 4, cores=2).threads == 1  # at least one
    assert with_worker_threads(MeshConfig(threads=3), 2, cores=16).threads == 3  # as given


# --- a step's exits --------------------------------------------------------------------------------


def test_a_steps_result_lists_each_leaving_request_once_with_how_it_leaves():
    from engine.api import TokenEvent
    from services.worker.executor import Failed, Finished, GivenBack, HandedOff, Refused, StepResult
    from services.worker.worker import Worker

    handoff = object()
    result = StepResult(
        events=[
            TokenEvent("a", 1, 3, "x", False),
            TokenEvent("b", 2, 7, "", True, "length"),
            TokenEvent("c", 3, 0, "", False),
        ]
        + [TokenEvent("d", 4, 1, "y", True)],
        refused={"e": "too long"},
        failed={"f": "engine fault"},
        given_back=["g"],
        exported={"h": handoff},  # type: ignore[dict-item]
    )
    assert result.exits() == [
        Finished("b", "length"),
        Finished("d", "stop"),  # an end without a reason is a stop
        Refused("e", "too long"),
        Failed("f", "engine fault"),
        GivenBack("g"),
        HandedOff("h", handoff),  # type: ignore[arg-type]
    ]
    outcome = Worker.outcome(result)  # what the driver is told: the requests that ended here, and the handed off
    assert (outcome.finished, outcome.departed) == (("b", "d", "e", "f", "g"), ("h",))
