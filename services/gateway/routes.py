"""The OpenAI routes: /v1/models, /metrics, /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from common.config import MeshConfig
from common.scheduling import schedule_records
from services.front import openai_api as oa
from services.front.core import Gateway, ServedModel
from services.gateway.responses import respond
from services.gateway.validation import chat_prompt, check_model, check_request_tokens, completion_prompt, sampling_of
from services.ops import RETRY_AFTER_S, roles_covered, transport_checks

GENERATION_ERRORS = oa.error_responses(400, 401, 404, 408, 413, 429, 503, 504)


def openai_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> dict[str, str]:
        return {"status": "ok", "model": request.app.state.model.name}

    @router.get("/health/live")
    async def live() -> dict[str, str]:
        """The process answers (a container's liveness probe)."""
        return {"status": "live"}

    @router.get(
        "/health/ready",
        responses={503: {"description": "Not ready: a check failed (see `checks`); retry after `Retry-After` seconds"}},
    )
    async def ready(request: Request) -> JSONResponse:
        """Ready for requests: the broker and the store answer, the queues a request travels
        exist on the broker (``routes``), and the schedule in force has a live worker for each role
        it needs."""
        gateway: Gateway = request.app.state.gateway
        checks = await transport_checks(gateway.transports, gateway.names)
        checks["routes"] = gateway.routable
        update = None
        if checks["store"]:
            update, _ = await schedule_records(gateway.transports.store, gateway.names)
        checks["workers"] = roles_covered(update)
        ok = all(checks.values())
        body = {"status": "ready" if ok else "not ready", "checks": checks}
        if ok:
            return JSONResponse(body)
        return JSONResponse(body, 503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @router.get("/v1/models", responses=oa.error_responses(401))
    async def models(request: Request) -> dict[str, Any]:
        served = request.app.state.model
        return {
            "object": "list",  # max_model_len: the context (prompt + output tokens), as vLLM names it
            "data": [
                {
                    "id": served.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "exegpt",
                    "max_model_len": served.max_context,
                }
            ],
        }

    @router.get(
        "/metrics",
        responses={
            200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **oa.error_responses(503),
        },
    )
    async def metrics(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        for queue in (gateway.names.encode_queue, gateway.names.handoff_queue):
            gateway.metrics.queue_depth.labels(queue).set(await gateway.bus.queue_depth(queue))
        gateway.metrics.observe_schedule(*await schedule_records(gateway.transports.store, gateway.names))
        body = gateway.metrics.render()
        mesh = getattr(request.app.state, "mesh", None)
        if mesh is not None:  # embedded: one process serves the scheduler's and its worker's too
            body += mesh.render_metrics()
        return Response(body, media_type="text/plain; version=0.0.4")

    @router.post("/v1/completions", responses=GENERATION_ERRORS)
    async def completions(body: oa.CompletionBody, request: Request) -> Response:
        model, config, prompt_ids = await checked_prompt(request, body, completion_prompt)
        sampling = sampling_of(body, body.max_tokens, prompt_ids, model, config)
        check_request_tokens(body, sampling, config)
        return await respond(request, oa.COMPLETIONS, body, prompt_ids, sampling)

    @router.post("/v1/chat/completions", responses=GENERATION_ERRORS)
    async def chat(body: oa.ChatBody, request: Request) -> Response:
        model, config, prompt_ids = await checked_prompt(request, body, chat_prompt)
        wanted = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            sampling_of(
                body, body.max_tokens, prompt_ids, model, config, prompt_param="messages"
            )  # both given: each must be acceptable
        sampling = sampling_of(body, wanted, prompt_ids, model, config, prompt_param="messages")
        check_request_tokens(body, sampling, config)
        return await respond(request, oa.CHAT, body, prompt_ids, sampling)

    return router


async def checked_prompt(
    request: Request, body: Any, build: Callable[..., list[int]]
) -> tuple[ServedModel, MeshConfig, list[int]]:
    """What both generation routes do first: the body's model checked against the one served, and
    its prompt built and tokenized off the event loop (both noted for the request's log line)."""
    model: ServedModel = request.app.state.model
    request.state.model = body.model
    check_model(body, model)
    config: MeshConfig = request.app.state.config
    prompt_ids = await asyncio.to_thread(build, body, model, config.max_prompt_chars)
    request.state.prompt_tokens = len(prompt_ids)
    return model, config, prompt_ids
