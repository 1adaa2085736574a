"""The plugins every gateway the command line starts (``serve``, ``gateway``, ``up``) mounts.

A plugin keeps ``services.gateway.plugins.Plugin``; add its module to ``plugin_modules``.
"""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.plugins import Lifespan, Plugin, load_plugins


def plugin_modules() -> tuple[Plugin, ...]:
    from services.batch import plugin as batch_plugin  # the OpenAI Batch API and a batch-job consumer

    return (batch_plugin,)


def gateway_plugins() -> tuple[list[APIRouter], list[Lifespan]]:
    """The routers and lifespans of ``plugin_modules()``."""
    return load_plugins(plugin_modules())
