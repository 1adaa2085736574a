"""The mesh's wire types are its own, converted at the services' boundaries: a field added to the
engine's or the optimizer's types without its wire counterpart fails here, not on the wire."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import pytest

from common.messages import codec
from common.messages.control import PinSchedule
from common.messages.schedule import SPLIT_POLICIES, ScheduleSpec
from common.messages.work import EncodeWork, Sampling
from common.transport.kv import KvPayload
from engine.api import KVHandoff, SamplingParams
from optimizer.schedule import POLICIES, Schedule
from services.hosting.handoffs import engine_handoff, kv_payload
from services.hosting.sampling import checked, engine_sampling
from services.schedules import planned, wire_schedule


def _fields(cls) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_the_wire_sampling_has_the_engine_parameters_fields_and_defaults():
    assert _fields(Sampling) == _fields(SamplingParams)


def test_every_sampling_field_reaches_the_engine():
    wire = Sampling(40, 0.7, 5, 0.9, 123, ("END",), False, 0.5, -0.25, 3, 2)
    params = engine_sampling(wire)
    assert isinstance(params, SamplingParams)
    assert dataclasses.asdict(params) == dataclasses.asdict(wire)


@pytest.mark.parametrize(
    "wire, named",
    [
        (Sampling(0), "max_tokens"),
        (Sampling(4, temperature=math.nan), "temperature"),
        (Sampling(4, top_k=2**63), "top_k"),
    ],
)
def test_sampling_the_engine_refuses_is_a_value_error_naming_the_field(wire, named):
    with pytest.raises(ValueError, match=named):
        engine_sampling(wire)
    with pytest.raises(ValueError, match=named):
        checked(wire)


def test_sampling_the_engine_takes_passes_the_check_unchanged():
    wire = Sampling(4, stop=("a", "b"))
    assert checked(wire) is wire


def _handoff(request_id: str = "r1") -> KVHandoff:
    kv = bytes(range(256)) * 4
    return KVHandoff(
        request_id,
        "tiny",
        SamplingParams(max_tokens=8, stop=("END",), seed=7),
        (1, 2, 3),
        (4, 5),
        "four",
        b"\x01\x02",
        "float32",
        (1, 2, 1, 16, 4),
        "llama:L,2,Hkv,T,D",
        kv,
    )


def test_a_handoff_crosses_the_data_plane_whole():
    sent = _handoff()
    payload = kv_payload(sent)
    assert payload.kv is sent.kv  # not copied
    assert (payload.request_id, payload.dtype, payload.shape, payload.layout) == (
        sent.request_id,
        sent.dtype,
        sent.shape,
        sent.layout,
    )
    assert payload.tokens == 5 and payload.nbytes == len(sent.kv)
    assert engine_handoff(KvPayload.from_bytes(payload.to_bytes())) == sent


def test_a_payload_whose_header_is_another_requests_or_unreadable_is_refused():
    payload = kv_payload(_handoff("r1"))
    with pytest.raises(ValueError, match="r2"):
        engine_handoff(dataclasses.replace(payload, request_id="r2"))
    with pytest.raises(ValueError, match="hand-off"):
        engine_handoff(dataclasses.replace(payload, header=b"\x00garbage"))


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb({"v": 999}), msgpack.packb({"v": 1, "kv": b""})])
def test_bytes_that_are_not_a_payload_of_this_version_are_a_value_error(data):
    with pytest.raises(ValueError):
        KvPayload.from_bytes(data)


def test_the_wire_schedule_has_the_planners_fields_and_defaults():
    assert _fields(ScheduleSpec) == _fields(Schedule)
    assert set(SPLIT_POLICIES) == {p for p in POLICIES if Schedule(p, encoder_devices=1, num_devices=2).split}


def test_a_schedule_crosses_the_wire_whole():
    s = Schedule("waa-m", 3, 40, 2, 1, 2, 1, 4, 1, 3, 1, 88.5, 12.25, 1, 0, 700)
    spec = wire_schedule(s)
    assert isinstance(spec, ScheduleSpec) and spec.split
    assert planned(codec.decode(codec.encode(PinSchedule(spec, 1.0)), PinSchedule).schedule) == s


@pytest.mark.parametrize(
    "spec, named",
    [
        (ScheduleSpec("fcfs"), "policy"),
        (ScheduleSpec(decode_batch=0), "decode_batch"),
        (ScheduleSpec("mixed", decode_batch=64, chunk_tokens=64), "chunk_tokens"),
        (ScheduleSpec(encode_batch="8"), "not a schedule|encode_batch"),  # type: ignore[arg-type]
    ],
)
def test_a_schedule_the_planner_refuses_is_a_value_error(spec, named):
    with pytest.raises(ValueError, match=named):
        planned(spec)


def test_a_request_continued_elsewhere_carries_the_wire_sampling_it_arrived_with():
    from types import SimpleNamespace

    from services.worker.requests import Held

    wire = Sampling(40, 0.7, 5, 0.9, 123, ("END",), False, 0.5, -0.25, 3, 2)
    work = EncodeWork("r1", "m", (1, 2, 3), wire, "events.g", 1.0, resume_ids=(7,), resume_text="x")
    delivery = SimpleNamespace(body=codec.encode(work), headers={})  # what a bus hands out, as Held reads it
    held = Held.from_work(delivery, work, engine_sampling(wire))
    held.generated.append(8)
    again = held.continuation("m")
    assert type(again.sampling) is Sampling and again.sampling == wire
    assert again.resume_ids == (7, 8) and codec.decode(codec.encode(again)) == again
