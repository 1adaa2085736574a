"""Front ends other packages add to every gateway the CLI starts (batch jobs, admin pages).

A plugin module exposes ``router() -> fastapi.APIRouter`` and, optionally,
``lifespan(app) -> async context manager`` entered after the gateway started (its handlers and
background tasks find the ``Gateway`` at ``app.state.gateway``). List the module in
``plugin_modules``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from types import ModuleType
from typing import Any

from fastapi import APIRouter, FastAPI

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]


def plugin_modules() -> tuple[ModuleType, ...]:
    """The plugins every gateway mounts. Imported here rather than at the top: a plugin builds on
    the gateway package (``services.gateway.openai_api``)."""
    from services.batch import plugin as batch_plugin  # OpenAI Batch API and a batch-job consumer

    return (batch_plugin,)


def load_plugins(modules: Sequence[ModuleType] | None = None) -> tuple[list[APIRouter], list[Lifespan]]:
    """The routers and lifespans of ``modules`` (default: ``plugin_modules()``)."""
    routers, lifespans = [], []
    for module in plugin_modules() if modules is None else modules:
        routers.append(module.router())
        if hasattr(module, "lifespan"):
            lifespans.append(module.lifespan)
    return routers, lifespans
