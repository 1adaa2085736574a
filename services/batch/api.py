"""The Batch API routes, and the job consumer that runs batches inside the gateway process.

Mount with ``create_app(..., routers=(batch_router(),), lifespans=(batch_lifespan(),))`` (the
gateway plugin ``services.batch.plugin`` does so for every gateway the CLI starts). The lifespan
runs after the gateway started, finds the ``Gateway`` at ``app.state.gateway``, and starts a job
consumer that runs jobs through it (so an embedded server runs its own batches; more consumers
can join from other processes with ``exegpt batch worker --executor mesh``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from common.names import RESULT_TTL_S, Names
from common.transport.batchdir import BatchDir
from services.batch.consumer import ConsumerConfig, JobConsumer, QueueDepthAdmission
from services.batch.legacy import adopt
from services.batch.mesh_executor import MeshExecutor
from services.batch.openai_batch import BatchApiError, BatchStore, Caller, Limits, too_large
from services.front import openai_api as oa

log = logging.getLogger(__name__)

FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, part headers and the purpose field
# The upload's body, for the OpenAPI document (the route parses the stream itself, so FastAPI
# cannot derive it).
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "JSON lines, one request each"},
                        "purpose": {"type": "string", "enum": ["batch"]},
                    },
                }
            }
        },
    }
}


class CreateBatch(BaseModel):
    """The body of ``POST /v1/batches``; any other field is refused (400, unsupported_parameter)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: StrictStr
    endpoint: Literal["/v1/completions", "/v1/chat/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[StrictStr, StrictStr] | None = None


class _TooLarge(Exception):
    pass


async def _counted(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """The request body, stopped (``_TooLarge``) as soon as more than ``limit`` bytes arrived."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise _TooLarge
        yield chunk


def caller_of(request: Request) -> Caller:
    """The API key's owner and scope (``RequireKeys`` puts its entry at ``request.state.api_key``);
    without a key (a gateway that has none configured): the anonymous owner."""
    entry = getattr(request.state, "api_key", None)
    if entry is None:
        return Caller()
    return Caller(owner=entry.owner, admin=entry.scope == "admin")


def batch_lifespan(
    *, run_consumer: bool = True, max_inflight: int = 16, yield_depth: int = 0, limits: Limits | None = None
) -> Callable[[FastAPI], Any]:
    """The Batch API's state, and (``run_consumer``) a job consumer in this process.

    ``yield_depth``: batch jobs start only while the encode queue holds at most this many
    interactive requests (-1: never wait)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = app.state.gateway
        config = app.state.config
        names = Names(config.namespace)
        data = BatchDir(config.batch_dir, config.namespace)
        store = BatchStore(
            gateway.bus,
            gateway.transports.store,
            data,
            names,
            app.state.model.name,
            limits or Limits(max_tokens_limit=config.max_tokens_limit),
        )
        app.state.batches = store
        await _adopt_legacy(gateway.transports.store, data, names)
        retention = asyncio.create_task(_expire_every(data, EXPIRE_EVERY_S))
        if not run_consumer:
            try:
                yield
            finally:
                retention.cancel()
            return
        executor = MeshExecutor(gateway, app.state.model, config.request_timeout_s)
        admission = None
        if yield_depth >= 0:
            admission = QueueDepthAdmission(gateway.bus, names.encode_queue, yield_depth, own_waiting=executor.waiting)
        consumer = JobConsumer(
            gateway.bus,
            data,
            names,
            executor,
            ConsumerConfig(f"{gateway.gateway_id}-batch", max_inflight, config.drain_timeout_s),
            admission,
        )
        app.state.batch_consumer = consumer
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        try:
            yield
        finally:
            retention.cancel()
            stop.set()
            await asyncio.wait({task}, timeout=config.drain_timeout_s + 5)
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return lifespan


async def _adopt_legacy(store: Any, data: BatchDir, names: Names) -> None:
    """Batches an earlier version kept in the store, moved into the batch folder (a store that does
    not answer now: at the next start)."""
    try:
        moved = await adopt(store, data, names)
    except Exception as exc:  # noqa: BLE001 - the gateway serves without them meanwhile
        log.warning("batches kept in the store by an earlier version not moved to %s: %r", data.root, exc)
        return
    if moved:
        log.info("%d batches and files kept in the store by an earlier version moved to %s", moved, data.root)


EXPIRE_EVERY_S = 3600.0


async def _expire_every(data: BatchDir, every_s: float) -> None:
    """Batches and files of the folder not written for RESULT_TTL_S (7 days) are deleted, hourly."""
    while True:
        try:
            gone = await data.expire(RESULT_TTL_S)
        except OSError as exc:
            log.warning("batch folder %s: could not delete expired batches: %s", data.root, exc)
        else:
            if gone:
                log.info("batch folder %s: %d expired batches and files deleted", data.root, gone)
        await asyncio.sleep(every_s)  # a period, not a synchronisation


def batch_router() -> APIRouter:
    """Routes of the Batch API; they need ``batch_lifespan`` entered on the same app.

    Every file and batch belongs to the owner of the API key that made it (``caller_of``)."""
    router = APIRouter()

    def batches(request: Request) -> BatchStore:
        return request.app.state.batches

    def refused(exc: BatchApiError) -> JSONResponse:
        return JSONResponse(oa.error_body(str(exc), param=exc.param, code=exc.code), exc.status)

    async def answer(call: Any) -> Any:
        try:
            return await call
        except BatchApiError as exc:
            return refused(exc)

    @router.post("/v1/files", responses=oa.error_responses(400, 401, 413, 503), openapi_extra=UPLOAD_BODY)
    async def upload(request: Request) -> Any:
        """Multipart ``file`` and ``purpose``. The body is parsed as it streams in and refused (413)
        once it exceeds the limit, so an oversized upload is never held whole."""
        store = batches(request)
        limit = store.limits.max_file_bytes
        body_limit = limit + FORM_OVERHEAD_BYTES
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > body_limit:
            return refused(too_large(limit))
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            return refused(
                BatchApiError(400, "send the file as multipart/form-data (fields `file` and `purpose`)", "file")
            )
        try:
            form = await MultiPartParser(
                request.headers, _counted(request.stream(), body_limit), max_files=1, max_fields=4
            ).parse()
        except _TooLarge:
            return refused(too_large(limit))
        except MultiPartException as exc:
            return refused(BatchApiError(400, f"bad multipart body: {exc.message}", "file"))
        try:
            unknown = sorted(set(form.keys()) - {"file", "purpose"})
            if unknown:
                return refused(
                    BatchApiError(
                        400,
                        f"Unsupported parameter: '{unknown[0]}' is not supported by this server",
                        unknown[0],
                        "unsupported_parameter",
                    )
                )
            file, purpose = form.get("file"), form.get("purpose")
            if not isinstance(file, StarletteUploadFile):
                return refused(BatchApiError(400, "the multipart field `file` is required", "file"))
            if not isinstance(purpose, str):
                return refused(BatchApiError(400, "the field `purpose` is required", "purpose"))
            content = await file.read(limit + 1)
            return await answer(
                store.upload(file.filename or "upload.jsonl", purpose, content, caller=caller_of(request))
            )
        finally:
            await form.close()

    @router.get("/v1/files/{file_id}", responses=oa.error_responses(401, 404, 410, 503))
    async def file_object(file_id: str, request: Request) -> Any:
        return await answer(batches(request).file_object(file_id, caller=caller_of(request)))

    @router.get("/v1/files/{file_id}/content", responses=oa.error_responses(401, 404, 410, 503))
    async def file_content(file_id: str, request: Request) -> Any:
        content = await answer(batches(request).file_content(file_id, caller=caller_of(request)))
        if isinstance(content, Response):
            return content
        return Response(content, media_type="application/jsonl")

    @router.post("/v1/batches", responses=oa.error_responses(400, 401, 404, 408, 413, 503))
    async def create(body: CreateBatch, request: Request) -> Any:
        return await answer(
            batches(request).create(
                body.input_file_id, body.endpoint, body.completion_window, body.metadata, caller=caller_of(request)
            )
        )

    @router.get("/v1/batches", responses=oa.error_responses(400, 401, 503))
    async def list_batches(request: Request, limit: int = 20) -> Any:
        return await answer(batches(request).list(max(1, min(limit, 100)), caller=caller_of(request)))

    @router.get("/v1/batches/{batch_id}", responses=oa.error_responses(401, 404, 410, 503))
    async def get_batch(batch_id: str, request: Request) -> Any:
        return await answer(batches(request).batch_object(batch_id, caller=caller_of(request)))

    @router.post("/v1/batches/{batch_id}/cancel", responses=oa.error_responses(401, 404, 410, 503))
    async def cancel(batch_id: str, request: Request) -> Any:
        return await answer(batches(request).cancel(batch_id, caller=caller_of(request)))

    return router
