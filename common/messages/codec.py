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
from typing import Any, TypeVar

import msgpack

from common.messages.control import Abort, SchedulePlan, ScheduleUpdate
from common.messages.events import EventBatch, Failure, Stamp, Token
from common.messages.handoff import KvReady
from common.messages.jobs import BatchJob, ChatTurn, JobResult
from common.messages.status import LengthSample, WorkerStatus
from common.messages.work import EncodeWork, Sampling

SCHEMA_VERSION = 1

# Tags are part of the wire format: never reuse or renumber one.
TAGS: dict[type, int] = {
    EncodeWork: 1,
    KvReady: 2,
    EventBatch: 3,
    ScheduleUpdate: 4,
    Abort: 5,
    WorkerStatus: 6,
    LengthSample: 7,
    # nested only
    Sampling: 101,
    Token: 102,
    Stamp: 103,
    Failure: 104,
    SchedulePlan: 105,
    ChatTurn: 106,
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
    return msgpack.packb([SCHEMA_VERSION, TAGS[type(message)], *_fields_to_wire(message)])


def decode(data: bytes, expected: type[T] | Any = object) -> T:
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
    message = _from_wire(cls, values)
    if expected is not object and not isinstance(message, _classes(expected)):
        raise DecodeError(f"unexpected {cls.__name__} here")
    return message


def _classes(expected: Any) -> tuple[type, ...]:
    args = typing.get_args(expected)
    return args if args else (expected,)


def _fields_to_wire(message: object) -> list[Any]:
    return [_to_wire(getattr(message, f.name)) for f in dataclasses.fields(message)]


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return _fields_to_wire(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


@functools.cache
def _hints(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _from_wire(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(hint):
        return _struct(hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _union(hint, args, value)
    if origin is tuple:
        return _tuple(args, value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise DecodeError(f"{value!r} is not a {hint.__name__}") from None
    return _scalar(hint, value)


def _struct(cls: type, value: Any) -> Any:
    fields = _hints(cls)
    if not isinstance(value, list) or len(value) != len(fields):
        raise DecodeError(f"{cls.__name__}: expected {len(fields)} fields")
    try:
        return cls(**{name: _from_wire(hint, v) for (name, hint), v in zip(fields, value)})
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{cls.__name__}: {exc}") from None


def _union(hint: Any, args: tuple[Any, ...], value: Any) -> Any:
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is not type(None):
            return _from_wire(arg, value)
    raise DecodeError(f"{value!r} does not fit {hint}")


def _tuple(args: tuple[Any, ...], value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise DecodeError(f"expected a sequence, got {type(value).__name__}")
    return tuple(_from_wire(args[0], v) for v in value)


def _scalar(hint: Any, value: Any) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise DecodeError(f"expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
    return value
