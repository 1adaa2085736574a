"""Front ends other packages add to every gateway the CLI starts (batch jobs, admin pages).

A plugin module exposes ``router() -> fastapi.APIRouter`` and, optionally,
``lifespan(app) -> async context manager`` entered after the gateway started (its handlers and
background tasks find the ``Gateway`` at ``app.state.gateway``). List the module here; a module
missing from a checkout is skipped.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractAsyncContextManager
from typing import Any, Callable

from fastapi import APIRouter, FastAPI

PLUGIN_MODULES: tuple[str, ...] = (
    "services.batch.plugin",  # OpenAI Batch API and a batch-job consumer
)

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]


def load_plugins(modules: tuple[str, ...] = PLUGIN_MODULES) -> tuple[list[APIRouter], list[Lifespan]]:
    routers, lifespans = [], []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        routers.append(module.router())
        if hasattr(module, "lifespan"):
            lifespans.append(module.lifespan)
    return routers, lifespans
