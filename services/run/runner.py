"""Entry points that run one service in this process until SIGTERM/SIGINT, then drain and close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from common.config import MeshConfig
from common.names import Names
from common.transport.connect import LocalHub, open_transports
from common.transport.nixl_kv import NixlUnavailable
from services.gateway import ServedModel, create_app, load_served_model
from services.gateway.keys import check_exposure, load_keys
from services.hosting.engines import EngineRunner, group_shape, load_engine, served_model_name
from services.ops import OpsServer, transport_checks
from services.run.liveness import keep_touching
from services.run.plugins import gateway_plugins

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    ready: asyncio.Event
    stopping: asyncio.Event

    def stop(self) -> None: ...

    async def run(self) -> None: ...


def announce(line: str) -> None:
    """One line on stdout that supervisors and tests wait for (``ready ...``)."""
    print(line, flush=True)


async def run_until_signalled(service: Stoppable, name: str) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    task = asyncio.create_task(service.run())
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        announce(f"ready {name}")
    else:
        ready.cancel()
    await task


async def run_worker(role: str, config: MeshConfig) -> None:
    """One worker or scheduler, with its operations port open from the start: /health/live
    answers while the model loads (in a thread), /health/ready once the service takes work.
    (Each role imports its own service: a gateway, restarted, starts without the scheduler's
    statistics libraries.)"""
    names = Names(config.namespace)
    started: list[tuple[Stoppable, Callable[[], bytes]]] = []

    async def checks() -> dict[str, bool]:
        if not started:
            return {"serving": False}
        serving = started[0][0].ready.is_set() and not started[0][0].stopping.is_set()
        return {"serving": serving, **await transport_checks(transports, names)}

    async def metrics() -> bytes:
        return started[0][1]() if started else b""

    ops = OpsServer(metrics, checks)
    url = await ops.start(config.ops_host, config.ops_port)
    log.info("%s: /metrics and /health/* at %s", role, url)
    beat = None
    try:
        try:
            transports = await open_transports(config, names, LocalHub(), kv=role == "worker")
        except NixlUnavailable as exc:  # one line, and no worker that could not hand its KV off
            announce(f"{role} refused to start: {exc}")
            raise SystemExit(2) from None
        if role == "scheduler":
            from services.scheduler.gauges import SchedulerMetrics
            from services.scheduler.service import SchedulerService

            scheduler = SchedulerService(config, transports)
            scheduler.announce = announce  # "leading ..." / "standby ..." lines, beside "ready ..."
            started.append((scheduler, SchedulerMetrics(scheduler).render))
        else:
            if group_shape(config).world == 1:  # loaded on the thread that runs its steps
                runner = await EngineRunner.loaded(lambda: load_engine(config))
            else:  # a group's ranks die with the thread that started them (PR_SET_PDEATHSIG): this one
                runner = EngineRunner(load_engine(config))
            from services.worker import Worker

            worker = Worker(config, transports, runner)
            started.append((worker, worker.metrics.render))
        if config.liveness_file:  # from here on: a group's load above blocks this loop for seconds, and
            # the supervisor judges only a file that exists (a process still starting has no age)
            beat = asyncio.create_task(keep_touching(Path(config.liveness_file), config.liveness_timeout_s))
        service = started[0][0]
        await run_until_signalled(service, f"{role} {getattr(service, 'worker_id', '')}".strip())
    finally:
        if beat is not None:
            beat.cancel()
        await ops.close()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


async def serve_http(config: MeshConfig, *, embedded: bool, standby: bool = False) -> None:
    """The gateway (and, embedded, every other service) behind uvicorn, under the gateway's
    connection limits.

    ``standby``: a spare gateway. It does the slow part of a start (imports, the tokenizer, the
    plugins), says ``standby gateway``, and waits for a line on stdin, which its supervisor writes
    when the gateway it stands in for died; then it binds and connects like any gateway. At the
    end of stdin (its supervisor is gone) it exits."""
    import uvicorn

    from services.gateway.connections import bounded_protocol, connection_limits

    check_exposure(config, load_keys(config))  # no keys: loopback only, unless insecure
    if not standby:
        sock = bind_socket(config.host, config.port)  # before loading models: a taken port fails fast
    hub = LocalHub()
    workers = None
    if embedded:  # one worker, one engine; the gateway takes the engine's tokenizer
        from services.run.embedded import local_workers

        runner = await EngineRunner.loaded(lambda: load_engine(config))
        engine = runner.engine
        model = ServedModel(served_model_name(config), engine.tokenizer, engine.max_context)

        def workers():
            return local_workers(config, hub, runners=[runner])
    else:  # a gateway only tokenizes: no weights
        model = load_served_model(config)

    routers, lifespans = gateway_plugins()
    if standby:
        announce("standby gateway")
        if not await asyncio.to_thread(sys.stdin.readline):
            return  # no one will call on it
        sock = bind_socket(config.host, config.port)
    url = f"http://{config.host}:{sock.getsockname()[1]}"
    app = create_app(
        config,
        model,
        hub=hub,
        workers=workers,
        routers=tuple(routers),
        lifespans=tuple(lifespans),
        on_ready=lambda: announce(f"ready gateway {url}"),
    )
    server = _uvicorn_server()(
        uvicorn.Config(app, log_level="warning", lifespan="on", http=bounded_protocol(connection_limits(config)))
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.serve(sockets=[sock])


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, but SIGTERM/SIGINT are ours: finish in-flight requests, then exit 0."""

        def capture_signals(self):
            return contextlib.nullcontext()

        def stop(self) -> None:
            self.should_exit = True

    return Server


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` on uvloop where it is installed (uvicorn[standard] brings it on Linux and
    macOS): every hop through the broker and the store costs less on its loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main_for(role: str, config: MeshConfig, *, standby: bool = False) -> int:
    if role in ("gateway", "serve"):
        run_loop(serve_http(config, embedded=role == "serve", standby=standby))
    else:
        run_loop(run_worker(role, config))
    sys.stdout.flush()
    return 0
