"""The Batch API routes, and the job consumer that runs batches inside the gateway process.

Mount with ``create_app(..., routers=(batch_router(),), lifespans=(batch_lifespan(),))`` (the
gateway plugin ``services.batch.plugin`` does so for every gateway the CLI starts). The lifespan
runs after the gateway started, finds the ``Gateway`` at ``app.state.gateway``, and starts a job
consumer that runs jobs through it (so an embedded server runs its own batches; more consumers
can join from other processes with ``exegpt batch worker --executor mesh``).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from services.batch.consumer import ConsumerConfig, JobConsumer, QueueDepthAdmission
from services.batch.mesh_executor import MeshExecutor
from common.names import Names
from services.batch.openai_batch import BatchApiError, BatchStore, Limits
from services.gateway import openai_api as oa


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def batch_lifespan(*, run_consumer: bool = True, max_inflight: int = 16, yield_depth: int = 0,
                   limits: Limits | None = None) -> Callable[[FastAPI], Any]:
    """The Batch API's state, and (``run_consumer``) a job consumer in this process.

    ``yield_depth``: batch jobs start only while the encode queue holds at most this many
    interactive requests (-1: never wait)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = app.state.gateway
        config = app.state.config
        names = Names(config.namespace)
        store = BatchStore(gateway.bus, gateway.transports.store, names, app.state.model.name,
                           limits or Limits(max_tokens_limit=config.max_tokens_limit))
        app.state.batches = store
        if not run_consumer:
            yield
            return
        executor = MeshExecutor(gateway, app.state.model, config.request_timeout_s)
        admission = None
        if yield_depth >= 0:
            admission = QueueDepthAdmission(gateway.bus, names.encode_queue, yield_depth,
                                            own_waiting=executor.waiting)
        consumer = JobConsumer(gateway.bus, gateway.transports.store, names, executor,
                               ConsumerConfig(f"{gateway.gateway_id}-batch", max_inflight,
                                              config.drain_timeout_s), admission)
        app.state.batch_consumer = consumer
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait({task}, timeout=config.drain_timeout_s + 5)
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return lifespan


def batch_router() -> APIRouter:
    """Routes of the Batch API; they need ``batch_lifespan`` entered on the same app."""
    router = APIRouter()

    def batches(request: Request) -> BatchStore:
        return request.app.state.batches

    async def answer(call: Any) -> Any:
        try:
            return await call
        except BatchApiError as exc:
            return JSONResponse(oa.error_body(str(exc), param=exc.param), exc.status)

    @router.post("/v1/files")
    async def upload(request: Request, file: UploadFile = File(...),
                     purpose: str = Form(...)) -> Any:
        content = await file.read()
        return await answer(batches(request).upload(file.filename or "upload.jsonl", purpose, content))

    @router.get("/v1/files/{file_id}")
    async def file_object(file_id: str, request: Request) -> Any:
        return await answer(batches(request).file_object(file_id))

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> Any:
        content = await answer(batches(request).file_content(file_id))
        if isinstance(content, Response):
            return content
        return Response(content, media_type="application/jsonl")

    @router.post("/v1/batches")
    async def create(body: CreateBatch, request: Request) -> Any:
        return await answer(batches(request).create(body.input_file_id, body.endpoint,
                                                    body.completion_window, body.metadata))

    @router.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20) -> Any:
        return await answer(batches(request).list(max(1, min(limit, 100))))

    @router.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request) -> Any:
        return await answer(batches(request).batch_object(batch_id))

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str, request: Request) -> Any:
        return await answer(batches(request).cancel(batch_id))

    return router
