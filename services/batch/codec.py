"""Encoding batch messages with the mesh codec's struct rules, under batch-only tags."""

from __future__ import annotations

from typing import TypeVar

import msgpack

from common.messages.codec import SCHEMA_VERSION, DecodeError, _fields_to_wire, _from_wire
from services.batch.messages import BatchJob, JobResult

# Tags are part of the wire format: never reuse or renumber one. The mesh's own tags are < 200.
TAGS: dict[type, int] = {BatchJob: 201, JobResult: 202}
BY_TAG: dict[int, type] = {tag: cls for cls, tag in TAGS.items()}

T = TypeVar("T")


def encode(message: BatchJob | JobResult) -> bytes:
    if type(message) not in TAGS:
        raise TypeError(f"not a batch message: {type(message).__name__}")
    return msgpack.packb([SCHEMA_VERSION, TAGS[type(message)], *_fields_to_wire(message)])


def decode(data: bytes, expected: type[T]) -> T:
    try:
        version, tag, *values = msgpack.unpackb(data, use_list=True, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not msgpack: {exc}") from None
    if version != SCHEMA_VERSION:
        raise DecodeError(f"schema version {version!r}, expected {SCHEMA_VERSION}")
    if BY_TAG.get(tag) is not expected:
        raise DecodeError(f"tag {tag!r} is not a {expected.__name__}")
    return _from_wire(expected, values)
