"""Front ends other packages add to a gateway (batch jobs, admin pages): the protocol a plugin keeps.

A plugin is a module with ``router() -> fastapi.APIRouter`` and, optionally, ``lifespan(app) ->
async context manager``, entered after the gateway started (its handlers and background tasks find
the ``Gateway`` at ``app.state.gateway``). The gateway knows no plugin by name: the list every
gateway the command line starts mounts is assembled with the services (``services.run.plugins``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]


class Plugin(Protocol):
    """A plugin module (``lifespan`` is optional: ``load_plugins`` looks for it)."""

    def router(self) -> APIRouter: ...


def load_plugins(modules: Sequence[Plugin]) -> tuple[list[APIRouter], list[Lifespan]]:
    """The routers and lifespans of ``modules``, in their order."""
    routers, lifespans = [], []
    for module in modules:
        routers.append(module.router())
        if hasattr(module, "lifespan"):
            lifespans.append(module.lifespan)
    return routers, lifespans
