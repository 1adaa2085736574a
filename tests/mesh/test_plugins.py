"""Gateway plugins: routers and lifespans that other packages add."""

from __future__ import annotations

import contextlib

import httpx

from common.config import MeshConfig
from common.transport.connect import LocalHub
from services.gateway import ServedModel, create_app
from services.gateway.plugins import load_plugins
from services.hosting.engines import EngineRunner
from services.run.embedded import local_workers
from tests.mesh import plugin_example
from tests.mesh.fake_engine import load


async def test_a_plugin_route_submits_through_the_gateway(namespace):
    routers, lifespans = load_plugins((plugin_example,))
    assert len(routers) == 1 and len(lifespans) == 1
    config, hub = MeshConfig(namespace=namespace, model="fake"), LocalHub()
    runner = EngineRunner(load())
    model = ServedModel("fake", runner.engine.tokenizer, runner.engine.max_context)

    def workers() -> contextlib.AbstractAsyncContextManager:
        return local_workers(config, hub, runners=[runner])

    app = create_app(config, model, hub=hub, workers=workers, routers=tuple(routers), lifespans=tuple(lifespans))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            body = (await client.post("/v1/echo-job/job-42")).json()
    assert body == {"job_id": "job-42", "tokens": 5}
    assert plugin_example.EVENTS[-2:] == ["start:Gateway", "stop"]
