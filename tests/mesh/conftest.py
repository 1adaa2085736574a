"""Fixtures shared by the mesh tests: unique namespaces, both transports, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest

from common.config import MeshConfig
from common.names import Names
from common.transport.connect import LocalHub, purge
from optimizer.schedule import Schedule
from services.gateway import ServedModel, create_app
from services.hosting.engines import EngineRunner
from services.run.embedded import LocalMesh, local_workers
from tests.brokers import AMQP_URL, REDIS_URL, nixl_loads

TIMEOUT_S = 30


@pytest.fixture
def mesh_config(transport_kind: str, namespace: str) -> MeshConfig:
    urls = {"amqp_url": AMQP_URL, "redis_url": REDIS_URL} if transport_kind == "broker" else {}
    if transport_kind == "broker" and not nixl_loads():  # the NIXL tests themselves say so
        urls["kv_transport"] = "redis"
    return MeshConfig(namespace=namespace, threads=1, heartbeat_s=0.2, heartbeat_timeout_s=1.0, **urls)


@pytest.fixture
async def hub() -> LocalHub:
    return LocalHub()


@pytest.fixture
async def cleanup(mesh_config: MeshConfig, hub: LocalHub):
    """Delete every queue, exchange and key of the test's namespace afterwards."""
    yield
    await purge_namespace(mesh_config, hub)


async def purge_namespace(config: MeshConfig, hub: LocalHub) -> None:
    await purge(config, Names(config.namespace), hub)


# --- an in-process mesh behind the gateway app -------------------------------------------------


@dataclass
class MeshUnderTest:
    client: httpx.AsyncClient
    mesh: LocalMesh
    config: MeshConfig
    hub: LocalHub
    model: str
    app: object = None

    async def pin(self, schedule: Schedule) -> None:
        """Run ``schedule`` and wait until every worker applied it (its roles included)."""
        update = await self.mesh.scheduler.pin(schedule) or self.mesh.scheduler.current
        await until(
            lambda: all(
                w.follower.version >= update.version
                and w.role == update.role_of(w.worker_id)
                and w.driver.policy.schedule == w.follower.schedule
                for w in self.mesh.workers
            ),
            [w.changed for w in self.mesh.workers],
        )

    async def all_workers_known(self) -> None:
        """Until the scheduler has allocated every worker (their first heartbeats arrived)."""
        ids = {w.worker_id for w in self.mesh.workers}
        await until(
            lambda: (
                self.mesh.scheduler.current is not None
                and {a.worker_id for a in self.mesh.scheduler.current.allocation} >= ids
            ),
            [self.mesh.scheduler.published],
        )


async def until(condition: Callable[[], bool], events: list[asyncio.Event], timeout_s: float = TIMEOUT_S) -> None:
    """Wait for ``condition``, re-checking it each time one of ``events`` is set; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError("condition not reached in time")
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        for e in events:
            e.clear()


@contextlib.asynccontextmanager
async def running_mesh(
    config: MeshConfig,
    hub: LocalHub,
    make_engine: Callable[[], object],
    *,
    workers: int = 1,
    schedule: Schedule | None = None,
    trace: bool = False,
) -> AsyncIterator[MeshUnderTest]:
    """The gateway app over a scheduler and ``workers`` workers in this process; ``schedule``
    is pinned and applied by every worker before the block runs."""
    runners = [EngineRunner(make_engine()) for _ in range(workers)]
    engine = runners[0].engine
    model = ServedModel(config.model, engine.tokenizer, engine.max_context)
    holder: dict[str, LocalMesh] = {}

    @contextlib.asynccontextmanager
    async def serve():
        async with local_workers(config, hub, runners=runners, trace=trace) as mesh:
            holder["mesh"] = mesh
            yield mesh

    app = create_app(config, model, hub=hub, workers=serve)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            m = MeshUnderTest(client, holder["mesh"], config, hub, config.model, app)
            await m.all_workers_known()
            if schedule is not None:
                await m.pin(schedule)
            yield m
    for runner in runners:
        runner.close()
