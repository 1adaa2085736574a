"""The launcher's restart budget: pure, with the times given."""

from __future__ import annotations

from services.run.launcher import RestartBudget, RestartPolicy

POLICY = RestartPolicy(max_restarts=3, window_s=100.0, backoff_s=(1.0, 8.0), healthy_s=10.0)


def test_a_child_that_keeps_dying_backs_off_then_spends_its_budget() -> None:
    budget = RestartBudget(POLICY)
    now, delays = 0.0, []
    for _ in range(3):
        delays.append(budget.died(now, up_since=now - 0.5))
        now += delays[-1] + 0.5
    assert delays == [1.0, 2.0, 4.0]
    assert budget.died(now, up_since=now - 0.5) is None  # a 4th death inside the window


def test_backoff_is_capped() -> None:
    budget = RestartBudget(RestartPolicy(max_restarts=10, window_s=1000.0, backoff_s=(1.0, 8.0), healthy_s=60.0))
    delays = [budget.died(float(i), up_since=float(i)) for i in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_the_budget_is_per_window_so_occasional_deaths_never_stop_the_mesh() -> None:
    """Kills spaced wider than the window, each followed by a healthy run: restarted every time,
    each after the shortest backoff."""
    budget = RestartBudget(POLICY)
    for i in range(20):
        now = i * 60.0
        assert budget.died(now, up_since=now - 50.0) == 1.0


def test_a_healthy_run_resets_the_backoff_but_not_the_window() -> None:
    budget = RestartBudget(POLICY)
    assert budget.died(0.0, up_since=-1.0) == 1.0
    assert budget.died(2.0, up_since=1.0) == 2.0
    assert budget.died(30.0, up_since=3.0) == 1.0  # it had stayed up 27 s > healthy_s
    assert budget.died(31.0, up_since=30.5) is None  # still 3 restarts within 100 s
    assert budget.died(101.0, up_since=31.0) == 1.0  # the first restart left the window


def test_up_shares_the_kv_budget_among_its_workers() -> None:
    from common.config import MeshConfig
    from services.run.launcher import with_kv_share

    shared = with_kv_share(MeshConfig(), workers=4, available=16 * 2**30)
    assert shared.kv_cache_gb == 2.0  # half of 16 GiB, over 4 workers
    given = MeshConfig(kv_cache_gb=3.0)
    assert with_kv_share(given, workers=4, available=16 * 2**30).kv_cache_gb == 3.0


def test_a_child_whose_liveness_file_stops_advancing_is_killed(tmp_path) -> None:
    import os
    import time

    from common.config import MeshConfig
    from services.run.children import ChildProcess, child_env
    from services.run.launcher import Child, Launcher, ProcessSpec

    launcher = Launcher(MeshConfig(liveness_timeout_s=3.0), [])
    spec = ProcessSpec("worker", ("worker",), 1)
    alive, hung = tmp_path / "alive", tmp_path / "hung"
    alive.touch()
    hung.touch()
    os.utime(hung, (time.time() - 10, time.time() - 10))  # last touched 10 s ago
    children = [
        Child(spec, i, ChildProcess(["sleep", "60"], env=child_env({})), liveness=path)
        for i, path in enumerate((alive, hung))
    ]
    try:
        for child in children:
            launcher._kill_if_hung(child)
        assert children[0].popen.poll() is None  # touched just now: left alone
        assert children[1].popen.poll() == -9  # SIGKILL: the broker gets its work back at once
    finally:
        for child in children:
            child.popen.kill()
            child.popen.wait()
        launcher.stop(1.0)


def test_a_dead_gateway_is_replaced_by_its_waiting_spare() -> None:
    import subprocess

    from common.config import MeshConfig
    from services.run.children import ChildProcess, child_env
    from services.run.launcher import Child, Launcher, ProcessSpec

    launcher = Launcher(MeshConfig(), [])
    spec = ProcessSpec("gateway", ("gateway",), 1)
    spawned = []

    def spawn(spec, index, *, standby=False):  # a spare that answers the line it is woken with
        cmd = ["head", "-n", "1"] if standby else ["sleep", "60"]
        process = ChildProcess(cmd, env=child_env({}), stdin=subprocess.PIPE if standby else None)
        spawned.append(Child(spec, index, process, standby=standby))
        return spawned[-1]

    launcher.spawn = spawn
    gateway = spawn(spec, 0)
    launcher.children = [gateway]
    try:
        launcher._keep_spare(gateway, now=0.0)
        assert launcher.spares == {}  # not before the gateway serves
        gateway.ready.set()
        launcher._keep_spare(gateway, now=0.0)
        spare = launcher.spares[("gateway", 0)]
        assert spare.standby and spare.label == "gateway-0-standby"
        gateway.popen.kill()
        gateway.popen.wait()
        launcher._restart(gateway, now=1.0)  # the backoff (0.25 s) first
        assert launcher.children == [gateway] and spare.popen.poll() is None
        launcher._restart(gateway, now=1.5)
        assert launcher.children == [spare] and not spare.standby and spare.label == "gateway-0"
        assert spare.process.wait_line("serve", 10) == "serve"  # woken: it listens now
        assert spare.budget is gateway.budget and launcher.spares == {}
    finally:
        for child in spawned:
            if child.popen.poll() is None:
                child.popen.kill()
                child.popen.wait()
        launcher.stop(1.0)


def test_a_child_process_logs_every_line_to_its_file_and_its_output_can_be_awaited(tmp_path) -> None:
    import os
    import sys

    import pytest

    from services.run.children import ChildExited, ChildProcess

    log = tmp_path / "child.log"
    log.write_text("an earlier run\n")  # appended to, never truncated
    script = "print('ready 1'); print('more'); print('last')"
    child = ChildProcess([sys.executable, "-c", script], env=dict(os.environ), log_path=log)
    assert child.wait_line("ready", 10) == "ready 1"
    assert child.wait_output(10)  # read to the end: every line is in output and in the file
    assert [line.strip() for line in child.output] == ["ready 1", "more", "last"]
    assert log.read_text() == "an earlier run\nready 1\nmore\nlast\n"
    with pytest.raises(ChildExited):
        child.wait_line("never", 10)
