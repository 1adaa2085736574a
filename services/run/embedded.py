"""Workers started inside the current process: the embedded server, tests and benchmarks.

Each service gets its own transports from the config (in-memory on the shared ``LocalHub`` when
the config has no URLs) and each worker its own engine runner, so the code path is the one
separate processes run.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from common.config import MeshConfig
from common.names import Names
from common.transport.connect import LocalHub, open_transports
from services.hosting.engines import EngineRunner
from services.scheduler.service import SchedulerService
from services.worker import Worker

START_TIMEOUT_S = 60.0


@dataclass
class LocalMesh:
    scheduler: SchedulerService | None
    workers: list[Worker] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def by_role(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role]

    def render_metrics(self) -> bytes:
        """The scheduler's and the first worker's metrics, which the embedded gateway's /metrics
        adds to its own (one process serves them all)."""
        from services.scheduler.gauges import SchedulerMetrics

        body = SchedulerMetrics(self.scheduler).render() if self.scheduler is not None else b""
        return body + b"".join(worker.metrics.render() for worker in self.workers[:1])


@asynccontextmanager
async def local_workers(
    config: MeshConfig, hub: LocalHub, *, runners: list[EngineRunner], scheduler: bool = True, trace: bool = False
) -> AsyncIterator[LocalMesh]:
    """Run a scheduler and one worker per engine runner until the block exits."""
    names = Names(config.namespace)
    mesh = LocalMesh(None)
    if scheduler:
        mesh.scheduler = SchedulerService(config, await open_transports(config, names, hub))
        mesh.tasks.append(asyncio.create_task(mesh.scheduler.run()))
        await until_ready([mesh.scheduler.ready], mesh.tasks)
    run = uuid.uuid4().hex[:6]
    for i, runner in enumerate(runners):  # ids sort in start order: allocations are predictable
        worker_config = config.model_copy(update={"worker_id": f"{config.worker_id or 'w'}{i:03d}-{run}"})
        mesh.workers.append(
            Worker(worker_config, await open_transports(config, names, hub, kv=True), runner, trace=trace)
        )
    started = [asyncio.create_task(worker.run()) for worker in mesh.workers]
    mesh.tasks += started
    for task in mesh.tasks:
        task.add_done_callback(_report_crash)
    try:
        await until_ready([w.ready for w in mesh.workers], mesh.tasks)
        yield mesh
    finally:
        await stop_all(mesh, config.drain_timeout_s)


def _report_crash(task: asyncio.Task[None]) -> None:
    exc = None if task.cancelled() else task.exception()
    if exc is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


async def until_ready(events: list[asyncio.Event], tasks: list[asyncio.Task[None]]) -> None:
    """Wait for every service to be ready; raise at once if one of them failed while starting."""
    ready: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in events)))
    done, _ = await asyncio.wait([ready, *tasks], timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        failed = [t for t in done if t.exception() is not None]
        raise RuntimeError("a service did not start") from (failed[0].exception() if failed else None)


async def stop_all(mesh: LocalMesh, timeout_s: float) -> None:
    for worker in mesh.workers:
        worker.stop()
    if mesh.scheduler is not None:
        mesh.scheduler.stop()
    done, late = await asyncio.wait(mesh.tasks, timeout=timeout_s) if mesh.tasks else (set(), set())
    for task in late:
        task.cancel()
    await asyncio.gather(*mesh.tasks, return_exceptions=True)
