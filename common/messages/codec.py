"""The one codec of the mesh: ``[schema version, type tag, fields...]`` as msgpack.

Structs are frozen dataclasses encoded positionally (field order is part of the schema); nested
structs, tuples, optionals and IntEnums follow their type hints. Anything else in the payload, an
unknown tag or another schema version raises ``DecodeError``: such a message goes to the dead queue.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, overload

import msgpack

from common.messages.control import Abort, PinSchedule, Replan, RoleAssignment, ScheduleUpdate, SetBound, SetSlo
from common.messages.events import EventBatch, Failure, Stamp, Token, TopLogprob
from common.messages.handoff import KvBlocks, KvReady
from common.messages.jobs import BatchJob, ChatTurn, JobResult
from common.messages.schedule import ScheduleSpec
from common.messages.status import (
    CalibrationPoint,
    CandidateFigures,
    LengthSample,
    SchedulerState,
    StepCost,
    WorkerStatus,
)
from common.messages.work import EncodeWork, Sampling

SCHEMA_VERSION = 13  # 2: ScheduleUpdate carries the Schedule and the allocation; 3: and its fencing;
# 4: WorkerStatus carries the shape of the worker's process group; 5: Sampling is the engine's
# SamplingParams (penalties, logprobs) and Token carries log-probabilities; 6: SamplingParams carries
# min_tokens, and Schedule encode_microbatches and encoder_tp_stages; 7: Schedule chunk_tokens (mixed);
# 8: WorkerStatus carries step costs, SchedulerState the SLO, forecast, calibration and candidates; SetSlo
# 9: KvReady carries the request to encode again (resume); KvBlocks, the NIXL hand-off descriptor;
# 10: WorkerStatus carries KV cache use, SchedulerState the lengths the plan was made on; 11: and the
# last search's wall time; 12: WorkerStatus carries the batch sizes the worker applies; 13: KvBlocks
# carries the cache's token count

# Tags are part of the wire format: never reuse or renumber one.
TAGS: dict[type, int] = {
    EncodeWork: 1,
    KvReady: 2,
    EventBatch: 3,
    ScheduleUpdate: 4,
    Abort: 5,
    WorkerStatus: 6,
    LengthSample: 7,
    PinSchedule: 8,
    SetBound: 9,
    Replan: 10,
    SchedulerState: 11,
    SetSlo: 12,
    KvBlocks: 13,  # a store record (kv_meta), not a queue message
    # nested only
    Sampling: 101,
    Token: 102,
    Stamp: 103,
    Failure: 104,
    # 105 was SchedulePlan (schema 1); never reuse it
    ChatTurn: 106,
    ScheduleSpec: 107,
    RoleAssignment: 108,
    TopLogprob: 109,
    StepCost: 110,
    CalibrationPoint: 111,
    CandidateFigures: 112,
    # batch jobs (producers -> job consumers -> reply queues)
    BatchJob: 201,
    JobResult: 202,
}
BY_TAG: dict[int, type] = {tag: cls for cls, tag in TAGS.items()}

T = TypeVar("T")


class DecodeError(ValueError):
    """Bytes that are not a message of this schema."""


def encode(message: object) -> bytes:
    if type(message) not in TAGS:
        raise TypeError(f"not a wire message: {type(message).__name__}")
    cls: Any = type(message)  # a hint, as _encoder takes it
    struct = _encoder(cls)
    assert struct is not None  # every tagged type is a struct
    data: bytes = msgpack.packb([SCHEMA_VERSION, TAGS[cls], *struct(message)])
    return data


@overload
def decode(data: bytes, expected: type[T]) -> T: ...


@overload
def decode(data: bytes, expected: Any = object) -> Any: ...


def decode(data: bytes, expected: Any = object) -> Any:
    """Decode one message; ``expected`` (a class or a union) narrows what is acceptable."""
    try:
        version, tag, *values = msgpack.unpackb(data, use_list=True, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not msgpack: {exc}") from None
    if version != SCHEMA_VERSION:
        raise DecodeError(f"schema version {version!r}, expected {SCHEMA_VERSION}")
    cls = BY_TAG.get(tag) if isinstance(tag, int) else None
    if cls is None:
        raise DecodeError(f"unknown tag {tag!r}")
    message = _decoder(cls)(values)
    if expected is not object and not isinstance(message, _classes(expected)):
        raise DecodeError(f"unexpected {cls.__name__} here")
    return message


def return_address(data: bytes, expected: Any) -> tuple[str, str] | None:
    """``(request_id, reply_to)`` of a message ``decode`` refused (a field out of its bounds,
    e.g. ``max_tokens`` 0) whose envelope is still readable, so that its requester can be told;
    None where the bytes are not a message of ``expected`` of this schema at all."""
    try:
        version, tag, *values = msgpack.unpackb(data, use_list=True, raw=False)
    except Exception:  # msgpack raises several unrelated types
        return None
    cls = BY_TAG.get(tag) if isinstance(tag, int) else None
    if version != SCHEMA_VERSION or cls is None or cls not in _classes(expected):
        return None
    names = [name for name, _ in _hints(cls)]
    if "request_id" not in names or "reply_to" not in names or len(values) != len(names):
        return None
    request_id, reply_to = values[names.index("request_id")], values[names.index("reply_to")]
    if not (isinstance(request_id, str) and isinstance(reply_to, str) and request_id and reply_to):
        return None
    return request_id, reply_to


def _classes(expected: Any) -> tuple[type, ...]:
    args = typing.get_args(expected)
    return args if args else (expected,)


# Encoders and decoders are built once per type hint from the structs' annotations, so a message
# costs a few calls per field, not a walk over its type hints.

Convert = Callable[[Any], Any]
SCALARS = (str, int, float, bool, bytes)


@functools.cache
def _hints(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _parts(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    origin = typing.get_origin(hint)
    if origin is types.UnionType:
        origin = typing.Union
    return origin, typing.get_args(hint)


def _is_struct(hint: Any) -> bool:
    """Whether ``hint`` is a message struct (a dataclass); a plain bool, so ``hint`` stays a hint."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@functools.cache
def _encoder(hint: Any) -> Convert | None:
    """What turns a value of ``hint`` into msgpack-ready data; None where it already is."""
    if _is_struct(hint):
        fields = [(name, _encoder(h)) for name, h in _hints(hint)]

        def struct(value: Any) -> list[Any]:
            return [getattr(value, name) if conv is None else conv(getattr(value, name)) for name, conv in fields]

        return struct
    origin, args = _parts(hint)
    if origin is typing.Union:
        inner = _encoder(next(a for a in args if a is not type(None)))
        return None if inner is None else (lambda value: None if value is None else inner(value))
    if origin is tuple:
        item = _encoder(args[0])
        return list if item is None else (lambda value: [item(v) for v in value])
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return lambda value: value.value
    return None


@functools.cache
def _decoder(hint: Any) -> Convert:
    """What turns msgpack data back into a value of ``hint``, raising DecodeError on a mismatch."""
    if _is_struct(hint):
        return _struct_decoder(hint)
    origin, args = _parts(hint)
    if origin is typing.Union:
        return _optional_decoder(hint, args)
    if origin is tuple:
        return _tuple_decoder(args[0])
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_decoder(hint)
    if origin is typing.Literal:
        return _literal_decoder(args)
    if hint in SCALARS:
        return _scalar_decoder(hint)
    raise TypeError(f"no wire form for {hint!r}")


def _struct_decoder(cls: type) -> Convert:
    convs = [_decoder(h) for _, h in _hints(cls)]
    count = len(convs)

    def struct(value: Any) -> Any:
        if type(value) is not list or len(value) != count:
            raise DecodeError(f"{cls.__name__}: expected {count} fields")
        try:
            return cls(*[conv(v) for conv, v in zip(convs, value)])
        except (TypeError, ValueError) as exc:  # DecodeError of a field, or a __post_init__ check
            raise DecodeError(f"{cls.__name__}: {exc}") from None

    return struct


def _optional_decoder(hint: Any, args: tuple[Any, ...]) -> Convert:
    others = [a for a in args if a is not type(None)]
    if len(others) != 1:
        raise TypeError(f"no wire form for {hint!r}")
    inner, optional = _decoder(others[0]), type(None) in args

    def union(value: Any) -> Any:
        if value is None and optional:
            return None
        return inner(value)

    return union


def _tuple_decoder(item_hint: Any) -> Convert:
    item = _decoder(item_hint)
    plain = item_hint in (str, int, bytes)

    def sequence(value: Any) -> tuple[Any, ...]:
        if type(value) is not list:
            raise DecodeError(f"expected a sequence, got {type(value).__name__}")
        if plain and all(type(v) is item_hint for v in value):
            return tuple(value)  # the common case, checked without a call per item
        return tuple([item(v) for v in value])

    return sequence


def _enum_decoder(cls: type[enum.Enum]) -> Convert:
    def member(value: Any) -> Any:
        try:
            return cls(value)
        except ValueError:
            raise DecodeError(f"{value!r} is not a {cls.__name__}") from None

    return member


def _literal_decoder(allowed: tuple[Any, ...]) -> Convert:
    def literal(value: Any) -> Any:
        if value not in allowed or type(value) is not type(allowed[0]):
            raise DecodeError(f"{value!r} is not one of {allowed}")
        return value

    return literal


def _scalar_decoder(hint: type) -> Convert:
    name = hint.__name__

    def scalar(value: Any) -> Any:
        kind = type(value)
        if kind is hint:
            return value
        if hint is float and kind is int:
            return float(value)
        raise DecodeError(f"expected {name}, got {kind.__name__}")

    return scalar
