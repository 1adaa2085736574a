"""A child process that is ready when it says so: the one way the launcher, the benchmarks, the
fault runs, the namespace run and the tests start a process and wait for it.

Its output (stdout and stderr together) is read by a thread from the start: every line is kept
(``output``, ``tail`` for errors), appended to ``log_path`` if given (a log that outlives the run),
handed to ``on_line`` if given, and queued for ``wait_line``,
which returns the next line that starts with a prefix (a ``ready ...`` line), or raises naming the
process and its last lines when it exits or the time is up. ``stop`` sends SIGTERM and, past its
time, kills the child's process group.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0


class ChildFailed(RuntimeError):
    """A child exited, or did not print the line it was waited for in time."""


class ChildExited(ChildFailed):
    """The child exited before the line it was waited for."""


class ChildNotReady(ChildFailed, TimeoutError):
    """The line the child was waited for did not come in time (the child still runs)."""


def child_env(overrides: Mapping[str, str], *, root: Path = REPO_ROOT) -> dict[str, str]:
    """This process's environment without its ``EXEGPT_*`` settings, plus ``overrides``; the
    checkout at ``root`` importable first, output unbuffered (lines arrive as they are printed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXEGPT_")}
    env.update(overrides)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ChildProcess:
    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        label: str | None = None,
        cwd: Path = REPO_ROOT,
        stdin: int | None = None,
        preexec_fn: Callable[[], None] | None = None,
        on_line: Callable[[str], None] | None = None,
        new_session: bool = True,
        log_path: Path | None = None,
    ) -> None:
        """``on_line``: called with each line, on the reading thread, before anyone waiting for
        it sees it. ``new_session``: the child leads a process group of its own (``kill`` reaches
        what it starts); False keeps it in this process's group (a terminal's Ctrl-C reaches it).
        ``log_path``: each line is also appended to this file as it is read."""
        self.label = label or Path(command[0]).name
        self.output: list[str] = []
        self.log_path = log_path
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._on_line = on_line
        self._new_session = new_session
        self.popen = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            preexec_fn=preexec_fn,
            start_new_session=new_session,
        )
        assert self.popen.stdout is not None
        self._log = open(log_path, "a", buffering=1) if log_path is not None else None  # closed by _read
        self._reader = threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True)
        self._reader.start()

    @classmethod
    def cli(cls, *args: str, env: Mapping[str, str], **kwargs: object) -> ChildProcess:
        """``exegpt ARGS`` (this interpreter, this checkout), labelled by its command."""
        kwargs.setdefault("label", args[0] if args else "exegpt")
        return cls([sys.executable, "-m", "services.cli", *args], env=env, **kwargs)  # type: ignore[arg-type]

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdin(self) -> IO[str] | None:
        return self.popen.stdin

    def running(self) -> bool:
        return self.popen.poll() is None

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self.output.append(line)
            if self._log is not None:
                self._log.write(line)
            if self._on_line is not None:
                self._on_line(line)
            self._lines.put(line)
        stdout.close()
        if self._log is not None:
            self._log.close()
        self._lines.put(None)

    def wait_output(self, timeout_s: float = 10.0) -> bool:
        """Wait (at most ``timeout_s``) until the child's output has been read to its end (every
        line in ``output`` and handed to ``on_line``); whether it has."""
        self._reader.join(timeout_s)
        return not self._reader.is_alive()

    def wait_line(self, prefix: str, timeout_s: float = READY_TIMEOUT_S) -> str:
        """The next line starting with ``prefix``, stripped; ChildFailed when the child exits or
        ``timeout_s`` passes first."""
        while True:
            try:
                line = self._lines.get(timeout=timeout_s)
            except queue.Empty:
                raise ChildNotReady(
                    f"{self.label}: no {prefix!r} line in {timeout_s:g} s; its output:\n{self.tail()}"
                ) from None
            if line is None:
                self._lines.put(None)  # exited: so says every later wait
                raise ChildExited(f"{self.label} exited ({self.popen.wait()}) before {prefix!r}:\n{self.tail()}")
            if line.startswith(prefix):
                return line.strip()

    def tail(self, n: int = 30) -> str:
        return "".join(self.output[-n:])

    def signal(self, sig: int) -> None:
        if self.running():
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL to the child (and to its process group where it leads one: what it started
        dies with it)."""
        if self.running():
            try:
                if self._new_session:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                else:
                    self.popen.kill()
            except ProcessLookupError:
                pass
        self.popen.wait()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then the process group killed if it has not exited within ``timeout_s``; its
        exit status (-9 when killed)."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


def stop_all(children: Sequence[ChildProcess], timeout_s: float = 15.0) -> None:
    """SIGTERM to every child at once (last started first), then each waited for, killed past
    ``timeout_s``."""
    for child in reversed(children):
        child.signal(signal.SIGTERM)
    for child in reversed(children):
        try:
            child.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
