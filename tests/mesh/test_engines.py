"""Loading a worker's engine from a ``package.module:factory`` model spec."""

import pytest

from common.config import MeshConfig
from services.run.engines import engine_factory, load_engine
from tests.mesh.fake_engine import FakeEngine


def test_a_factory_spec_builds_its_engine():
    assert isinstance(load_engine(MeshConfig(model="tests.mesh.fake_engine:load")), FakeEngine)


@pytest.mark.parametrize("spec, message", [
    ("tests.mesh.not_there:load", "no module 'tests.mesh.not_there'"),
    ("tests.mesh.fake_engine:not_there", "has no factory 'not_there'"),
])
def test_a_spec_that_names_nothing_is_an_error(spec, message):
    with pytest.raises(ValueError, match=message):
        engine_factory(spec)


async def test_an_engine_is_loaded_on_the_thread_that_runs_its_steps():
    import threading

    from services.run.engines import EngineRunner, start_engine

    loaded_on: list[threading.Thread] = []

    def load() -> FakeEngine:
        loaded_on.append(threading.current_thread())
        return FakeEngine()

    runner = await EngineRunner.loaded(load)
    try:
        assert isinstance(runner.engine, FakeEngine)
        assert await runner.call(threading.current_thread) is loaded_on[0]
        assert loaded_on[0] is not threading.current_thread()
    finally:
        runner.close()
    runner = await start_engine(MeshConfig(model="tests.mesh.fake_engine:load"))
    runner.close()
    assert isinstance(runner.engine, FakeEngine)


async def test_a_load_that_fails_raises_its_error():
    from services.run.engines import EngineRunner

    def load() -> FakeEngine:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        await EngineRunner.loaded(load)
