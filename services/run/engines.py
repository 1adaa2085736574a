"""Loading an engine for a service, and calling it off the event loop.

A model spec is a name or folder for ``engine.load_engine`` (smollm2, tiny-llama, ...), or
``package.module:factory`` for another implementation of the engine protocol (test doubles, custom
engines); the factory is called with ``device`` and ``num_threads``. The spec is a setting that
travels to every worker process, so the factory is imported by name; a module or factory that is
not there is an error that names the spec, never a fallback.
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
        return engine_factory(config.model)(device=config.device, num_threads=config.threads)
    shape = group_shape(config)
    if not shape.single:  # one model over a group of processes; this one drives it
        from engine.parallel.group import load_group_engine

        engine = load_group_engine(config.model, shape, device=config.device, num_threads=config.threads,
                                   dtype=config.dtype, quant=config.quant,
                                   master_addr=config.master_addr, master_port=config.master_port)
        # admission counts the whole model's KV bytes per token: each rank holds a share of that
        engine.set_kv_budget(kv_budget_bytes(config, engine.device))
        return engine
    from engine import load_engine as load  # the engine package's loader

    engine = load(config.model, device=config.device, num_threads=config.threads, dtype=config.dtype,
                  quant=config.quant)
    engine.set_kv_budget(kv_budget_bytes(config, engine.device))
    return engine


def engine_factory(spec: str) -> Callable[..., Engine]:
    """The factory a ``package.module:factory`` spec names; ValueError when it is not there."""
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"model {spec!r}: no module {exc.name!r}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {spec!r}: {module_name} has no factory {attr!r}")
    return factory


CPU_KV_SHARE = 0.5  # of the memory available when a worker starts, for its KV cache
GPU_KV_SHARE = 0.9  # of the GPU memory free once the weights are loaded


def kv_budget_bytes(config: MeshConfig, device: str) -> int:
    """The KV-cache budget of one worker: ``kv_cache_gb``, or a share of what is free now."""
    if config.kv_cache_gb is not None:
        return int(config.kv_cache_gb * 2**30)
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * GPU_KV_SHARE)
    return int(available_memory() * CPU_KV_SHARE)


def available_memory() -> int:
    """Bytes of memory available to new allocations on this host (MemAvailable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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
