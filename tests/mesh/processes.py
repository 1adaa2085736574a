"""Separate mesh processes for tests: started with the CLI, ready lines awaited, always killed
(``services.run.children``, the one way the project starts a child process)."""

from __future__ import annotations

from services.run.children import ChildProcess, child_env, stop_all


class ProcessMesh:
    def __init__(self, config_env: dict[str, str]) -> None:
        self.env = child_env(config_env)
        self.procs: list[ChildProcess] = []

    def start(self, *args: str, stdin: int | None = None) -> ChildProcess:
        proc = ChildProcess.cli(*args, env=self.env, stdin=stdin)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: ChildProcess, timeout_s: float = 30.0) -> int:
        return proc.stop(timeout_s)

    @staticmethod
    def kill(proc: ChildProcess) -> None:
        proc.kill()

    def close(self) -> None:
        stop_all(self.procs)


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
