"""The mesh's wire types are its own, converted at the services' boundaries: a field added to the
engine's or the optimizer's types without its wire counterpart fails here, not on the wire."""

from __future__ import annotations

import dataclasses
import math

import pytest

from common.messages.work import Sampling
from engine.api import SamplingParams
from services.hosting.sampling import checked, engine_sampling


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
