"""Pure pieces: codec, names, config, lifecycle, schedule following, per-request event ordering."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from pydantic import ValidationError

from common.config import MeshConfig
from common.lifecycle import Stage, Timeline
from common.messages import codec
from common.messages.control import Abort, ScheduleUpdate
from common.messages.events import EventBatch, Failure, Stamp, Token
from common.messages.handoff import KvReady
from common.messages.status import LengthSample, WorkerStatus
from common.messages.work import EncodeWork, Sampling
from common.names import Names
from optimizer.schedule import Schedule
from services.gateway.core import Pending
from services.worker import Outbox, ScheduleFollower, plan_of, schedule_of

EXAMPLES = [
    EncodeWork("r1", "m", (1, 2, 3), Sampling(4, 0.5, 3, 0.9, 7, ("\n", "END"), True), "q", 1.5),
    KvReady("r1", "enc-1", "q", "ns:kv:r1", 3, 2, 1.5),
    EventBatch("dec-1", "decoder", 3, 2, (Token("r1", 0, 5, "x", False), Token("r1", 1, 6, "", True, "stop")),
               (Stamp("r1", Stage.DECODE_START, 2.0),), (Failure("r2", 400, "too long"),)),
    ScheduleUpdate(4, plan_of(Schedule(policy="rra", encode_batch=3)), 9.0),
    Abort("r9"),
    WorkerStatus("enc-1", "encoder", 4, 0, "applied", 3.0),
    LengthSample("r1", 3, 7, "length", 4.0),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    assert codec.decode(codec.encode(message)) == message


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb([2, 1]), msgpack.packb([1, 999]), msgpack.packb({"type": "x"}),
    msgpack.packb([1, 5, 3]),  # Abort with an int id
    msgpack.packb([1, 5]),  # Abort without fields
    msgpack.packb([1, 101, 1, 0.0, 0, 1.0, None, [], False]),  # a nested-only struct at top level
])
def test_garbage_raises_decode_error(data):
    with pytest.raises(codec.DecodeError):
        codec.decode(data, ScheduleUpdate | Abort | EncodeWork)


def test_decode_refuses_a_message_of_another_direction():
    with pytest.raises(codec.DecodeError):
        codec.decode(codec.encode(Abort("r")), EncodeWork)


def test_values_out_of_range_are_rejected_at_the_boundary():
    bad = msgpack.packb([1, 4, 1, ["nope", 1, 1, 1, 1, 1, 0, 1, 0, 1], 0.0])
    follower = ScheduleFollower()
    with pytest.raises(ValueError, match="policy"):
        follower.offer(codec.decode(bad, ScheduleUpdate))  # unknown policy: never applied
    assert not follower.apply()
    assert codec.decode(msgpack.packb([1, 7, "r", 1, 2, "stop", 3])).finished_at == 3.0  # int -> float


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
        MeshConfig(prefetch_count=0)


def test_timeline_derives_latencies():
    t = Timeline()
    for stage, at in ((Stage.ARRIVED, 10.0), (Stage.FIRST_TOKEN, 10.5), (Stage.FINISHED, 12.5)):
        t.mark(stage, at)
    t.mark(Stage.ARRIVED, 99.0)  # a repeated stage keeps its first stamp
    t.output_tokens = 5
    assert (t.ttft_s, t.e2e_s, t.tpot_s) == (0.5, 2.5, 0.5)


def test_schedule_follower_applies_only_newer_versions_at_the_boundary():
    follower = ScheduleFollower()
    v2 = ScheduleUpdate(2, plan_of(Schedule(encode_batch=2)), 0.0)
    assert follower.offer(v2) and follower.version == 0  # not before the boundary
    assert not follower.offer(ScheduleUpdate(1, plan_of(Schedule()), 0.0))
    assert follower.apply() and (follower.version, follower.schedule.encode_batch) == (2, 2)
    assert not follower.apply()
    assert schedule_of(plan_of(Schedule(policy="rra", tp_degree=2))) == Schedule(policy="rra", tp_degree=2)


def tok(i: int, finished: bool = False) -> Token:
    return Token("r", i, 100 + i, str(i), finished, "length" if finished else None)


async def test_pending_keeps_each_index_once_and_in_order():
    pending = Pending("r", 3)
    assert not pending.on_token(tok(1))  # early: held back
    assert not pending.on_token(tok(0))
    assert not pending.on_token(tok(0))  # redelivered duplicate
    assert pending.on_token(tok(2, finished=True))
    assert not pending.on_token(tok(2, finished=True))
    got = [t.index async for t in pending.tokens(timeout_s=1)]
    assert got == [0, 1, 2] and pending.timeline.output_tokens == 3


async def test_pending_reports_a_failure_once():
    pending = Pending("r", 3)
    assert pending.on_failure(Failure("r", 400, "bad"))
    assert not pending.on_failure(Failure("r", 500, "again"))
    with pytest.raises(Exception, match="bad"):
        async for _ in pending.tokens(timeout_s=1):
            pass


def test_outbox_groups_events_per_submitter():
    box = Outbox()
    box.token("q1", tok(0))
    box.token("q2", tok(0))
    box.stamp("q1", "r", Stage.ENCODE_END, 1.0)
    batches = box.batches("enc", "encoder", 3, 2)
    assert set(batches) == {"q1", "q2"}
    assert batches["q1"].stamps == (Stamp("r", Stage.ENCODE_END, 1.0),)
    assert dataclasses.replace(batches["q2"], tokens=()) == EventBatch("enc", "encoder", 3, 2)
