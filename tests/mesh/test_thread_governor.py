"""The engine runner's choice of threads per step (pure logic, and the runner applying it)."""

from __future__ import annotations

import asyncio

import pytest

from services.hosting.threads import ThreadGovernor, step_key


def run(governor: ThreadGovernor, key, seconds_with: dict[int, float], steps: int) -> list[int]:
    chosen = []
    for _ in range(steps):
        n = governor.choose(key)
        governor.record(key, n, seconds_with[n])
        chosen.append(n)
    return chosen


def test_the_team_runs_while_it_is_faster_and_one_thread_is_tried_now_and_then():
    governor = ThreadGovernor(2, explore_every=8)
    chosen = run(governor, "decode", {2: 0.013, 1: 0.017}, 64)
    assert chosen[:2] == [2, 1]  # each measured once
    assert chosen.count(1) == 1 + 64 // 8  # then one try of the other in every 8 steps
    assert governor.best("decode") == 2


def test_contention_moves_steps_to_one_thread_and_its_end_moves_them_back():
    governor = ThreadGovernor(2, explore_every=8)
    run(governor, "decode", {2: 0.013, 1: 0.017}, 16)
    contended = run(governor, "decode", {2: 0.090, 1: 0.020}, 32)
    assert governor.best("decode") == 1
    assert contended[-16:].count(2) <= 2  # the team only as a try
    quiet = run(governor, "decode", {2: 0.013, 1: 0.017}, 32)
    assert governor.best("decode") == 2 and quiet[-16:].count(1) <= 2


def test_kinds_of_steps_are_measured_apart():
    governor = ThreadGovernor(2, explore_every=4)
    run(governor, step_key(0, 1), {2: 0.013, 1: 0.017}, 12)
    run(governor, step_key(512, 0), {2: 0.100, 1: 0.060}, 12)
    assert governor.best(step_key(0, 1)) == 2 and governor.best(step_key(512, 0)) == 1
    assert step_key(0, 5) == ("decode", 8) and step_key(0, 8) == ("decode", 8) and step_key(100, 3) == ("prefill", 128)


def test_one_thread_has_nothing_to_choose():
    governor = ThreadGovernor(1)
    assert run(governor, "decode", {1: 0.02}, 5) == [1] * 5
    with pytest.raises(ValueError):
        ThreadGovernor(0)


def test_the_runner_loads_and_steps_on_one_thread_with_the_chosen_threads():
    import threading

    torch = pytest.importorskip("torch")
    from services.hosting.engines import EngineRunner

    seen: list[tuple[str, int]] = []

    class Engine:
        pass

    def load():
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return Engine()

    def step():
        seen.append((threading.current_thread().name, torch.get_num_threads()))

    async def main():
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            runner = await EngineRunner.loaded(load)
            assert runner.governor is not None and runner.governor.choices == (2, 1)
            for _ in range(3):
                await runner.step(("decode", 1), step)
            runner.close()
        finally:
            torch.set_num_threads(before)

    asyncio.run(main())
    assert len({name for name, _ in seen}) == 1  # loaded and stepped on the same thread
    assert [n for _, n in seen[1:3]] == [2, 1]  # the team, then one thread, each measured once
