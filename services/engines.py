"""Loading an engine for a service, and calling it off the event loop.

A model spec is a name or folder for ``engine.load_engine`` (smollm2, tiny-llama, ...), or
``package.module:factory`` for another implementation of the engine protocol (test doubles, custom
engines); the factory is called with ``device`` and ``num_threads``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from common.config import MeshConfig
from engine.api import Engine

T = TypeVar("T")


def is_factory_spec(model: str) -> bool:
    return ":" in model and not os.path.exists(model) and "/" not in model.split(":", 1)[0]


def load_engine(config: MeshConfig) -> Engine:
    if is_factory_spec(config.model):
        module_name, attr = config.model.split(":", 1)
        factory = getattr(importlib.import_module(module_name), attr)
        return factory(device=config.device, num_threads=config.threads)
    shape = group_shape(config)
    if not shape.single:  # one model over a group of processes; this one drives it
        from engine.parallel.group import load_group_engine

        return load_group_engine(config.model, shape, device=config.device, num_threads=config.threads,
                                 dtype=config.dtype, quant=config.quant,
                                 master_addr=config.master_addr, master_port=config.master_port)
    from engine import load_engine as load  # the engine package's loader

    return load(config.model, device=config.device, num_threads=config.threads, dtype=config.dtype,
                quant=config.quant)


def group_shape(config: MeshConfig):
    """The worker group's shape from ``tp``, ``pp`` and ``stage_layers``."""
    from engine.parallel.shape import GroupShape

    return GroupShape.parse(config.tp, config.pp, config.stage_layers, config.pp_microbatches)


def served_model_name(config: MeshConfig) -> str:
    """The model id clients name in requests: the spec as given."""
    return config.model


class EngineRunner:
    """Runs engine calls one at a time on a dedicated thread, so the event loop keeps serving."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
        close = getattr(getattr(self.engine, "runner", None), "close", None)
        if close is not None:  # a worker group: stop its follower processes
            close()
