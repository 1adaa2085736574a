"""``exegpt up``: a local mesh of separate processes, supervised, stopped cleanly together.

The process list comes from ``deploy/processes.toml``. Each child is ``python -m services.cli
ROLE`` with the mesh settings in its environment; the launcher waits for each group's ``ready``
lines, restarts a child that dies (after a backoff, within a restart budget per time window:
``RestartBudget``), kills (and so restarts) a worker or scheduler whose liveness file stops
advancing (``services.run.liveness``: a hung process, whose unacknowledged work the broker hands
to others once its connection closes), and on SIGINT/SIGTERM sends SIGTERM to every child, waits for them to drain,
and kills what is left.

A gateway has a spare (``STANDBY``): a second process started with ``--standby`` once the gateway
is ready, which imports, loads the tokenizer and the plugins, then waits. When the gateway dies,
its restart (after the same backoff and budget) wakes the spare, which only has to listen and
connect, instead of starting a process from nothing; a new spare is started once it serves.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from common.config import MeshConfig
from services.run.children import ChildExited, ChildNotReady, ChildProcess
from services.run.liveness import age_s

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = REPO_ROOT / "deploy" / "processes.toml"
READY_TIMEOUT_S = 300.0
SUPERVISE_INTERVAL_S = 0.2  # children are looked at this often
WATCHED = ("worker", "scheduler")  # the roles whose liveness file the launcher reads
STANDBY = ("gateway",)  # the roles kept with a warm spare that takes over when one dies


@dataclass(frozen=True)
class RestartPolicy:
    """At most ``max_restarts`` restarts of one child within any ``window_s``; each restart waits
    a backoff that doubles from ``backoff_s[0]`` up to ``backoff_s[1]`` while the child keeps dying,
    and starts again from the bottom once it has stayed up ``healthy_s``."""

    max_restarts: int = 5
    window_s: float = 300.0
    backoff_s: tuple[float, float] = (0.25, 30.0)
    healthy_s: float = 60.0


class RestartBudget:
    """One child's restarts (pure: times are given)."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.restarts: deque[float] = deque()  # when each restart in the window was granted
        self.streak = 0  # deaths since the child last stayed up healthy_s

    def died(self, now: float, up_since: float) -> float | None:
        """The child died at ``now`` (it had run since ``up_since``): seconds to wait before its
        restart, or None when the window's budget is spent."""
        p = self.policy
        while self.restarts and now - self.restarts[0] >= p.window_s:
            self.restarts.popleft()
        if len(self.restarts) >= p.max_restarts:
            return None
        if now - up_since >= p.healthy_s:
            self.streak = 0
        delay = min(p.backoff_s[0] * 2**self.streak, p.backoff_s[1])
        self.streak += 1
        self.restarts.append(now)
        return delay


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    args: tuple[str, ...]
    replicas: int


@dataclass
class Child:
    spec: ProcessSpec
    index: int
    process: ChildProcess | None = None  # set as soon as it is started (its output is forwarded here)
    budget: RestartBudget = field(default_factory=lambda: RestartBudget(RestartPolicy()))
    started_at: float = field(default_factory=time.monotonic)
    restart_at: float | None = None  # a restart waiting for its backoff
    ready_line: str | None = None
    liveness: Path | None = None  # the file it touches while alive
    standby: bool = False  # a spare, waiting to be woken
    ready: threading.Event = field(default_factory=threading.Event)  # it printed its ready line

    @property
    def label(self) -> str:
        return f"{self.spec.name}-{self.index}" + ("-standby" if self.standby else "")

    @property
    def popen(self) -> subprocess.Popen[str]:
        assert self.process is not None
        return self.process.popen

    def forward(self, line: str) -> None:
        """Copy a line of the child's output with its label, before anyone acts on it."""
        print(f"[{self.label}] {line}", end="", flush=True)
        if line.startswith("ready "):
            self.ready.set()

    def wake(self) -> None:
        """A spare takes over: a line on its stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write("serve\n")
        self.popen.stdin.flush()
        self.standby = False


def read_spec(path: Path, counts: dict[str, int]) -> list[ProcessSpec]:
    data = tomllib.loads(path.read_text())
    specs = []
    for entry in data.get("process", []):
        replicas = int(str(entry.get("replicas", "1")).format(**counts))
        specs.append(ProcessSpec(entry["name"], tuple(entry["args"]), replicas))
    return specs


def child_env(config: MeshConfig) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in config.model_dump(exclude={"worker_id"}).items():
        if value is not None:  # API keys are SecretStr: their children need the keys themselves
            secret = getattr(value, "get_secret_value", None)
            env[f"EXEGPT_{name.upper()}"] = secret() if secret else str(value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Launcher:
    def __init__(self, config: MeshConfig, specs: list[ProcessSpec]) -> None:
        self.config, self.specs = config, specs
        self.env = child_env(config)
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self.beats = Path(tempfile.mkdtemp(prefix="exegpt-up-"))  # the children's liveness files
        self.spares: dict[tuple[str, int], Child] = {}
        self.spare_budgets: dict[tuple[str, int], RestartBudget] = {}
        self.spare_at: dict[tuple[str, int], float | None] = {}  # when the next spare may start; None: never

    def spawn(self, spec: ProcessSpec, index: int, *, standby: bool = False) -> Child:
        env, liveness = self.env, None
        if spec.name in WATCHED:
            liveness = self.beats / f"{spec.name}-{index}"
            liveness.unlink(missing_ok=True)  # a new process: no age until it first touches it
            env = {**self.env, "EXEGPT_LIVENESS_FILE": str(liveness)}
        args = (*spec.args, "--standby") if standby else spec.args
        child = Child(spec, index, liveness=liveness, standby=standby)
        child.process = ChildProcess.cli(
            *args,
            env=env,
            label=child.label,
            stdin=subprocess.PIPE if standby else None,
            on_line=child.forward,
            new_session=False,  # in `up`'s process group: what stops `up` as a whole stops it too
        )
        return child

    def wait_ready(self, child: Child) -> str:
        """Its ready line; RuntimeError when it exits first, does not start in time, or the mesh
        is stopping."""
        assert child.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                child.ready_line = child.process.wait_line("ready ", 0.5)
                return child.ready_line
            except ChildNotReady:
                continue
            except ChildExited:
                break
        raise RuntimeError(f"{child.label} did not start (exit status {child.popen.poll()})")

    def start(self) -> str:
        """Start every group in order; return the gateway's URL (or '' if there is none)."""
        url = ""
        for spec in self.specs:
            group = [self.spawn(spec, i) for i in range(spec.replicas)]
            self.children += group
            for child in group:
                line = self.wait_ready(child)
                if line.startswith("ready gateway "):
                    url = line.split()[-1]
        return url

    def supervise(self) -> None:
        """Restart children that die, after their backoff, until asked to stop (or a child has
        spent its restart budget: then the mesh stops)."""
        while not self.stopping.wait(SUPERVISE_INTERVAL_S):
            for child in self.children:
                if child.popen.poll() is None:
                    self._kill_if_hung(child)
                    self._keep_spare(child, time.monotonic())
                elif not self.stopping.is_set():
                    self._restart(child, time.monotonic())

    def _keep_spare(self, child: Child, now: float) -> None:
        """A serving child of a ``STANDBY`` role gets a spare, and one that died is replaced
        (after a backoff, within a budget of its own: spares that keep dying are given up)."""
        key = (child.spec.name, child.index)
        if child.spec.name not in STANDBY or not child.ready.is_set():
            return
        spare = self.spares.get(key)
        if spare is not None and spare.popen.poll() is None:
            return
        if spare is not None:  # it died while waiting
            del self.spares[key]
            budget = self.spare_budgets.setdefault(key, RestartBudget(RestartPolicy()))
            delay = budget.died(now, spare.started_at)
            print(
                f"exegpt up: {spare.label} exited ({spare.popen.returncode}); "
                + ("no more spares" if delay is None else f"another in {delay:g} s"),
                file=sys.stderr,
            )
            self.spare_at[key] = None if delay is None else now + delay
        spare_at = self.spare_at.get(key, now)
        if spare_at is not None and now >= spare_at:
            self.spares[key] = self.spawn(child.spec, child.index, standby=True)

    def _kill_if_hung(self, child: Child) -> None:
        """SIGKILL (a stopped process dies of it too) a child whose liveness file is older than
        ``liveness_timeout_s``; the next look restarts it."""
        age = age_s(child.liveness) if child.liveness is not None else None
        if age is not None and age > self.config.liveness_timeout_s:
            print(
                f"exegpt up: {child.label} stopped answering (alive {age:.1f} s ago); killing it",
                file=sys.stderr,
                flush=True,
            )
            child.popen.kill()
            child.popen.wait()

    def _restart(self, child: Child, now: float) -> None:
        if child.restart_at is None:
            delay = child.budget.died(now, child.started_at)
            if delay is None:
                p = child.budget.policy
                print(
                    f"exegpt up: {child.label} died {p.max_restarts + 1} times within {p.window_s:.0f} s; "
                    "stopping the mesh",
                    file=sys.stderr,
                )
                self.stopping.set()
                return
            print(
                f"exegpt up: {child.label} exited ({child.popen.returncode}); restarting in {delay:g} s",
                file=sys.stderr,
            )
            child.restart_at = now + delay
        if now < child.restart_at:
            return
        spare = self.spares.pop((child.spec.name, child.index), None)
        if spare is not None and spare.popen.poll() is None:  # warm: it takes the dead one's place
            spare.wake()
            spare.budget, spare.started_at = child.budget, now
            self.children[self.children.index(child)] = spare
            return
        fresh = self.spawn(child.spec, child.index)
        child.process, child.started_at, child.restart_at = fresh.process, now, None
        child.liveness, child.ready = fresh.liveness, fresh.ready

    def stop(self, timeout_s: float) -> None:
        """SIGTERM in reverse start order (gateway first), wait, then kill stragglers."""
        self.stopping.set()
        for spare in self.spares.values():  # nothing to drain
            if spare.popen.poll() is None:
                spare.popen.kill()
                spare.popen.wait()
        for child in reversed(self.children):
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in reversed(self.children):
            try:
                child.popen.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait()
        shutil.rmtree(self.beats, ignore_errors=True)


def with_worker_threads(config: MeshConfig, workers: int, cores: int | None = None) -> MeshConfig:
    """``config`` with torch threads per engine process set, unless given: this host's cores shared by
    the engine processes `up` starts here (each worker's whole group), at least one each. Without
    it every process would take all the cores and they would fight over them."""
    if config.threads is not None:
        return config
    from services.hosting.engines import group_shape

    processes = max(1, workers) * group_shape(config).world
    return config.model_copy(update={"threads": max(1, (cores or os.cpu_count() or 1) // processes)})


def with_kv_share(config: MeshConfig, workers: int, available: int | None = None) -> MeshConfig:
    """``config`` with each worker's KV-cache budget set, unless given: on the CPU, the share of
    this host's available memory (``services.hosting.engines.CPU_KV_SHARE``) divided among the workers
    `up` starts, so that together they stay within it. (A GPU worker sizes its own from its GPU.)"""
    if config.kv_cache_gb is not None or config.device == "cuda":
        return config
    from services.hosting.engines import CPU_KV_SHARE, available_memory

    share = (available or available_memory()) * CPU_KV_SHARE / max(1, workers)
    return config.model_copy(update={"kv_cache_gb": share / 2**30})


def run_up(config: MeshConfig, spec_path: Path, workers: int) -> int:
    config = with_kv_share(with_worker_threads(config, workers), workers)
    launcher = Launcher(config, read_spec(spec_path, {"workers": workers}))
    previous = {sig: signal.signal(sig, lambda *_: launcher.stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        url = launcher.start()
        print(f"ready mesh {url}", flush=True)
        launcher.supervise()
    except RuntimeError as exc:
        print(f"exegpt up: {exc}", file=sys.stderr)
        return 1
    finally:
        launcher.stop(config.drain_timeout_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
