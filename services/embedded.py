"""Workers started inside the current process: the embedded server, tests and benchmarks.

Each service gets its own transports from the config (in-memory on the shared ``LocalHub`` when
the config has no URLs) and its own engine, so the code path is the one separate processes run.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from common.config import MeshConfig
from common.names import Names
from common.transport.connect import LocalHub, open_transports
from services.decoder import DecoderService
from services.encoder import EncoderService
from services.engines import EngineRunner
from services.scheduler import SchedulerService

START_TIMEOUT_S = 60.0


@dataclass
class LocalMesh:
    scheduler: SchedulerService | None
    encoders: list[EncoderService] = field(default_factory=list)
    decoders: list[DecoderService] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def workers(self) -> list[EncoderService | DecoderService]:
        return [*self.encoders, *self.decoders]


@asynccontextmanager
async def local_workers(config: MeshConfig, hub: LocalHub, *, encoders: list[EngineRunner],
                        decoders: list[EngineRunner], scheduler: bool = True) -> AsyncIterator[LocalMesh]:
    """Run a scheduler and one encoder/decoder per engine runner until the block exits."""
    names = Names(config.namespace)
    mesh = LocalMesh(None)
    if scheduler:
        mesh.scheduler = SchedulerService(config, await open_transports(config, names, hub))
        mesh.tasks.append(asyncio.create_task(mesh.scheduler.run()))
        await until_ready([mesh.scheduler.ready], mesh.tasks)
    for runner in encoders:
        mesh.encoders.append(EncoderService(config, await open_transports(config, names, hub), runner))
    for runner in decoders:
        mesh.decoders.append(DecoderService(config, await open_transports(config, names, hub), runner))
    mesh.tasks += [asyncio.create_task(worker.run()) for worker in mesh.workers]
    try:
        await until_ready([w.ready for w in mesh.workers], mesh.tasks)
        yield mesh
    finally:
        await stop_all(mesh, config.drain_timeout_s)


async def until_ready(events: list[asyncio.Event], tasks: list[asyncio.Task[None]]) -> None:
    """Wait for every service to be ready; raise at once if one of them failed while starting."""
    ready = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in events)))
    done, _ = await asyncio.wait([ready, *tasks], timeout=START_TIMEOUT_S,
                                 return_when=asyncio.FIRST_COMPLETED)
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
