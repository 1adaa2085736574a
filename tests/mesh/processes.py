"""Separate mesh processes for tests: started with the CLI, ready lines awaited, always killed."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0


@dataclass
class Proc:
    role: str
    popen: subprocess.Popen[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)

    def wait_line(self, prefix: str, timeout_s: float = READY_TIMEOUT_S) -> str:
        """The next stdout line starting with ``prefix``; fails on exit or timeout."""
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(
                    f"{self.role}: no {prefix!r} line in {timeout_s} s; its output:\n" + "".join(self.output[-30:])
                ) from None
            if line is None:
                raise AssertionError(f"{self.role} exited ({self.popen.poll()}):\n" + "".join(self.output[-30:]))
            if line.startswith(prefix):
                return line.strip()


def env_for(config_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXEGPT_")}
    env.update(config_env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ProcessMesh:
    def __init__(self, config_env: dict[str, str]) -> None:
        self.env = env_for(config_env)
        self.procs: list[Proc] = []

    def start(self, *args: str, stdin: int | None = None) -> Proc:
        popen = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=stdin,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        proc = Proc(args[0], popen)
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        self.procs.append(proc)
        return proc

    @staticmethod
    def _read(proc: Proc) -> None:
        assert proc.popen.stdout is not None
        for line in proc.popen.stdout:
            proc.output.append(line)
            proc.lines.put(line)
        proc.popen.stdout.close()
        proc.lines.put(None)

    def stop(self, proc: Proc, timeout_s: float = 30.0) -> int:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
        try:
            return proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            return -9

    @staticmethod
    def kill(proc: Proc) -> None:
        if proc.popen.poll() is None:
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill(proc)


async def stream_completion(client, body: dict, on_chunk=None) -> tuple[str, int, str | None]:
    """POST a streaming completion: (text, chunks, finish reason); ``on_chunk()`` after each chunk."""
    import json

    text, count, reason = "", 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["text"]
                count += 1
                reason = chunk["choices"][0]["finish_reason"] or reason
                if on_chunk is not None:
                    on_chunk()
    return text, count, reason
