"""The operations port of a worker or scheduler process: ``/metrics``, ``/health/live`` and
``/health/ready`` on a small HTTP server of its own (the gateway serves the same routes on its API
port), so that Prometheus and container probes reach every process.

- ``/health/live``: 200 while the process's event loop answers (a hung loop answers nothing).
- ``/health/ready``: 200 when every check passes, else 503 with ``Retry-After``; the body names
  each check (``{"status": "ready"|"not ready", "checks": {"broker": true, ...}}``).
- ``/metrics``: the Prometheus text format.

The server speaks just enough HTTP/1.1 for probes and scrapers (GET and HEAD, one request per
connection); it takes no framework so that it costs a worker nothing while the engine runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from common.names import Names
from common.transport.connect import Transports

log = logging.getLogger(__name__)

Checks = Callable[[], Awaitable[dict[str, bool]]]
CHECK_TIMEOUT_S = 2.0  # a broker or store slower than this to answer counts as down
RETRY_AFTER_S = 5
READ_TIMEOUT_S = 5.0
MAX_HEAD_BYTES = 8192
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def transport_checks(transports: Transports, names: Names) -> dict[str, bool]:
    """Whether the broker and the store answer now (each bounded by ``CHECK_TIMEOUT_S``)."""

    async def answers(call: Awaitable[object]) -> bool:
        try:
            await asyncio.wait_for(call, CHECK_TIMEOUT_S)
        except Exception:  # any failure to answer is "down"; the reason is not the probe's business
            return False
        return True

    broker, store = await asyncio.gather(
        answers(transports.bus.queue_depth(names.encode_queue)), answers(transports.store.get(names.schedule))
    )
    return {"broker": broker, "store": store}


class OpsServer:
    """Serves ``render()`` at /metrics and ``checks()`` at /health/ready until ``close()``."""

    def __init__(self, render: Callable[[], Awaitable[bytes]], checks: Checks) -> None:
        self.render, self.checks = render, checks
        self._server: asyncio.AbstractServer | None = None
        self.url = ""

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host:port`` (0: a free port); returns the base URL."""
        try:
            self._server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            raise ValueError(f"ops port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound = self._server.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            status, headers, body = await self.respond(head)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        except Exception:  # a failing metric collector must not take the port down
            log.exception("ops port: request failed")
            status, headers, body = 500, {"Content-Type": "text/plain"}, b"internal error\n"
        method = head.split(b" ", 1)[0]
        lines = [
            f"HTTP/1.1 {status} {REASONS.get(status, '')}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def respond(self, head: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return 400, {"Content-Type": "text/plain"}, b"bad request\n"
        path = target.split("?", 1)[0]
        if path not in ROUTES:
            return 404, {"Content-Type": "text/plain"}, b"not found: /metrics, /health/live, /health/ready\n"
        if method not in ("GET", "HEAD"):
            return 405, {"Allow": "GET, HEAD", "Content-Type": "text/plain"}, b"method not allowed\n"
        if path == "/metrics":
            return 200, {"Content-Type": PROMETHEUS_TYPE}, await self.render()
        if path == "/health/live":
            return 200, JSON, b'{"status": "live"}'
        checks = await self.checks()
        ready = all(checks.values())
        body = json.dumps({"status": "ready" if ready else "not ready", "checks": checks}).encode()
        if ready:
            return 200, JSON, body
        return 503, {**JSON, "Retry-After": str(RETRY_AFTER_S)}, body


ROUTES = ("/metrics", "/health/live", "/health/ready")
JSON = {"Content-Type": "application/json"}
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def roles_covered(update) -> bool:
    """Whether the schedule in force (a ScheduleUpdate, or None before the first) gives a live
    worker each role it needs: encoders and decoders under a split (WAA), workers otherwise."""
    if update is None:
        return False
    roles = {assignment.role for assignment in update.allocation}
    needed = {"encoder", "decoder"} if update.schedule.split else {"worker"}
    return needed <= roles
