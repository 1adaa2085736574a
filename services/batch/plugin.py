"""The batch gateway plugin: the OpenAI Batch API and a job consumer in every gateway process.

Listed in ``services.run.plugins.plugin_modules``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI

from services.batch.api import batch_lifespan, batch_router


def router() -> APIRouter:
    return batch_router()


def lifespan(app: FastAPI) -> Any:
    return batch_lifespan()(app)
