"""A gateway plugin for tests: one route that submits through the Gateway, and a lifespan."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request

from common.messages.work import Sampling

EVENTS: list[str] = []


def router() -> APIRouter:
    r = APIRouter()

    @r.post("/v1/echo-job/{job_id}")
    async def job(job_id: str, request: Request) -> dict[str, object]:
        gateway = request.app.state.gateway
        ids = request.app.state.model.tokenizer.encode("job")
        pending = await gateway.submit(ids, Sampling(max_tokens=5), request_id=job_id, stream=False)
        tokens = [t async for t in pending.tokens()]
        return {"job_id": job_id, "tokens": len(tokens)}

    return r


@asynccontextmanager
async def lifespan(app: FastAPI):
    EVENTS.append(f"start:{type(app.state.gateway).__name__}")
    yield
    EVENTS.append("stop")
