"""Fixtures shared by the mesh tests: unique namespaces, both transports, cleanup."""

from __future__ import annotations


import pytest

from tests.brokers import AMQP_URL, REDIS_URL

from common.config import MeshConfig
from common.names import Names
from common.transport.connect import LocalHub, purge


@pytest.fixture
def mesh_config(transport_kind: str, namespace: str) -> MeshConfig:
    urls = {"amqp_url": AMQP_URL, "redis_url": REDIS_URL} if transport_kind == "broker" else {}
    return MeshConfig(namespace=namespace, threads=1, **urls)


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

import contextlib
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import httpx

from services.embedded import LocalMesh, local_workers
from services.engines import EngineRunner
from services.gateway import ServedModel, create_app


@dataclass
class MeshUnderTest:
    client: httpx.AsyncClient
    mesh: LocalMesh
    config: MeshConfig
    hub: LocalHub
    model: str
    app: object = None


@contextlib.asynccontextmanager
async def running_mesh(config: MeshConfig, hub: LocalHub, make_engine: Callable[[], object], *,
                       encoders: int = 1, decoders: int = 1) -> AsyncIterator[MeshUnderTest]:
    enc = [EngineRunner(make_engine()) for _ in range(encoders)]
    dec = [EngineRunner(make_engine()) for _ in range(decoders)]
    engine = enc[0].engine
    model = ServedModel(config.model, engine.tokenizer, engine.max_context)
    holder: dict[str, LocalMesh] = {}

    @contextlib.asynccontextmanager
    async def workers():
        async with local_workers(config, hub, encoders=enc, decoders=dec) as mesh:
            holder["mesh"] = mesh
            yield mesh

    app = create_app(config, model, hub=hub, workers=workers)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield MeshUnderTest(client, holder["mesh"], config, hub, config.model, app)
    for runner in enc + dec:
        runner.close()
