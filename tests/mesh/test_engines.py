"""Loading a worker's engine from a ``package.module:factory`` model spec."""

import pytest

from common.config import MeshConfig
from services.hosting.engines import engine_factory, load_engine
from tests.mesh.fake_engine import FakeEngine


def test_a_factory_spec_builds_its_engine():
    assert isinstance(load_engine(MeshConfig(model="tests.mesh.fake_engine:load")), FakeEngine)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tests.mesh.not_there:load", "no module 'tests.mesh.not_there'"),
        ("tests.mesh.fake_engine:not_there", "has no factory 'not_there'"),
    ],
)
def test_a_spec_that_names_nothing_is_an_error(spec, message):
    with pytest.raises(ValueError, match=message):
        engine_factory(spec)
