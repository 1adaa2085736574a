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
import sys
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from common.config import MeshConfig
from engine.api import Engine
from services.hosting.threads import ThreadGovernor

T = TypeVar("T")


def is_factory_spec(model: str) -> bool:
    return ":" in model and not os.path.exists(model) and "/" not in model.split(":", 1)[0]


def load_engine(config: MeshConfig) -> Engine:
    if is_factory_spec(config.model):
        return engine_factory(config.model)(device=config.device, num_threads=config.threads)
    shape = group_shape(config)
    if not shape.single:  # one model over a group of processes; this one drives it
        from engine.parallel.group import load_group_engine

        engine = load_group_engine(
            config.model,
            shape,
            device=config.device,
            num_threads=config.threads,
            dtype=config.dtype,
            quant=config.quant,
            master_addr=config.master_addr,
            master_port=config.master_port,
        )
        # admission counts the whole model's KV bytes per token: each rank holds a share of that
        engine.set_kv_budget(kv_budget_bytes(config, engine.device))
        return engine
    from engine import load_engine as load  # the engine package's loader

    engine = load(
        config.model, device=config.device, num_threads=config.threads, dtype=config.dtype, quant=config.quant
    )
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
    """Runs engine calls one at a time on a dedicated thread, so the event loop keeps serving.

    Build it with ``loaded`` where this process computes with the engine: the model is then loaded on
    the thread that runs its steps, so torch's OpenMP has one team of threads (a second team, from
    loading on another thread, makes OpenMP put idle threads to sleep after every parallel region:
    a SmolLM2 decode step took 24 ms instead of 13.5 here). ``step`` runs an engine step with as
    many threads as the governor (``services.hosting.threads``) chooses: the team, or one thread while
    the team is measured slower because other work shares the cores."""

    def __init__(self, engine: Engine, executor: ThreadPoolExecutor | None = None, threads: int | None = None) -> None:
        self.engine = engine
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.governor = ThreadGovernor(threads) if threads is not None and threads > 1 else None

    @classmethod
    async def loaded(cls, load: Callable[[], Engine]) -> EngineRunner:
        """A runner whose engine ``load()`` built on the runner's own thread."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(executor, load)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(engine, executor, await loop.run_in_executor(executor, torch_threads))

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def step(self, key: Hashable, fn: Callable[..., T], *args: object) -> T:
        """``call`` for an engine step of kind ``key`` (``services.hosting.threads.step_key``), with the
        threads the governor chooses."""
        if self.governor is None:
            return await self.call(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._governed, key, fn, args)

    def _governed(self, key: Hashable, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        import torch

        assert self.governor is not None
        threads = self.governor.choose(key)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        result = fn(*args)
        self.governor.record(key, threads, time.perf_counter() - started)
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=False)
        close = getattr(getattr(self.engine, "runner", None), "close", None)
        if close is not None:  # a worker group: stop its follower processes
            close()


def torch_threads() -> int | None:
    """torch's intra-op threads, where torch is loaded (an engine of another kind may not use it)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None
