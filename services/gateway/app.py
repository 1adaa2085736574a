"""The gateway's HTTP face: an OpenAI-compatible API built by ``create_app`` (no module-level app),
with its lifespan, from the parts beside it: the OpenAI routes (``routes``), a request's validation
(``validation``), its answer whole or streamed (``responses``), the error handlers (``errors``), the
middleware (``middleware``) and the OpenAPI document (``openapi``).

Tokenization happens in the gateway: it loads the model's tokenizer, so that it can reject a prompt
longer than the context with a 400 before any work is queued, and count prompt tokens for usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Protocol

from fastapi import APIRouter, FastAPI

from common.config import MeshConfig
from common.names import Names
from common.tracing import tracing_for
from common.transport.connect import LocalHub, open_transports
from services.front.core import Gateway, ServedModel
from services.front.metrics import Metrics
from services.gateway.admin import admin_router
from services.gateway.admission import Admission
from services.gateway.bodies import BoundBodies
from services.gateway.dashboard import Dashboard, dashboard_router
from services.gateway.errors import install_error_handlers, is_upload
from services.gateway.keys import RequireKeys, load_keys
from services.gateway.middleware import LogRequests, TraceRequests
from services.gateway.openapi import openapi_document
from services.gateway.outage import AnswerOutages
from services.gateway.plugins import Lifespan
from services.gateway.routes import openai_router
from services.hosting.engines import is_factory_spec, load_engine, served_model_name


def load_served_model(config: MeshConfig) -> ServedModel:
    """The served model's tokenizer and context, read without its weights (``engine.load_tokenizer``).

    A ``package.module:factory`` spec is another engine implementation: only the engine it builds
    knows its tokenizer, so that one is built.
    """
    if is_factory_spec(config.model):
        engine = load_engine(config)
        return ServedModel(served_model_name(config), engine.tokenizer, engine.max_context)
    from engine import load_tokenizer

    info = load_tokenizer(config.model)
    return ServedModel(served_model_name(config), info.tokenizer, info.max_context)


class InProcess(Protocol):
    """What the embedded server starts beside its gateway (``services.run.embedded.LocalMesh``)."""

    def render_metrics(self) -> bytes:
        """Its services' metrics, which the gateway's /metrics adds to its own."""
        ...


WorkersFactory = Callable[[], AbstractAsyncContextManager[InProcess]]


def create_app(
    config: MeshConfig,
    model: ServedModel,
    *,
    hub: LocalHub | None = None,
    workers: WorkersFactory | None = None,
    routers: tuple[APIRouter, ...] = (),
    lifespans: tuple[Lifespan, ...] = (),
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The gateway app; ``workers`` starts in-process services first (embedded mode).

    ``/v1/*`` needs a key of scope user, ``/admin/*`` one of scope admin (``services.gateway.keys``);
    the keys are those the config names (none: every route is open).

    ``routers`` are mounted next to the OpenAI routes (their handlers find the ``Gateway`` at
    ``request.app.state.gateway``); ``lifespans`` are entered after the gateway started (and left
    before it closes); ``on_ready`` is called once the gateway can take requests.
    """
    hub = hub or LocalHub()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if workers is not None:  # embedded: their metrics join the gateway's at /metrics
                app.state.mesh = await stack.enter_async_context(workers())
            transports = await open_transports(config, Names(config.namespace), hub)
            gateway = Gateway(config, transports, model.name, metrics)
            await gateway.start()
            stack.push_async_callback(gateway.close)
            app.state.gateway = gateway
            app.state.dashboard = Dashboard(gateway, app)
            stack.push_async_callback(app.state.dashboard.close)
            app.state.admission = Admission(
                config,
                is_live=gateway.pending.__contains__,
                read_depth=lambda: gateway.bus.queue_depth(gateway.names.encode_queue),
            )
            for extra in lifespans:
                await stack.enter_async_context(extra(app))
            if on_ready is not None:
                on_ready()
            yield

    app = FastAPI(title="ExeGPT mesh gateway", lifespan=lifespan)
    app.state.model, app.state.config, app.state.metrics = model, config, metrics
    install_error_handlers(app)
    app.add_middleware(AnswerOutages)  # innermost: a broker or store failure of any route is a 503
    app.add_middleware(
        BoundBodies,
        max_bytes=config.max_body_bytes,
        timeout_s=config.body_timeout_s,
        exempt=lambda scope: is_upload(app, scope),
    )  # after the key check: no body read for a 401
    app.add_middleware(RequireKeys, keys=load_keys(config))
    app.add_middleware(LogRequests)  # outermost: it also sees what RequireKeys refuses
    if (tracing := tracing_for(config)).enabled:  # off: not even a middleware
        app.add_middleware(TraceRequests, tracing=tracing)  # a server span around all of it
    app.include_router(openai_router())
    app.include_router(admin_router())
    app.include_router(dashboard_router())
    for router in routers:
        app.include_router(router)
    app.openapi = lambda: openapi_document(app, model, config)  # type: ignore[method-assign]
    return app
