"""The operator's page: ``GET /dashboard`` (a static shell, open) and the JSON it polls,
``GET /admin/dashboard/state`` (scope admin, like the rest of ``/admin``).

One poll answers everything the page shows, in one store round trip plus one queue-depth read:
the ``ScheduleUpdate`` and ``SchedulerState`` as ``GET /admin/schedule`` gives them (every field,
so a state record that grows new fields reaches the page unchanged), the workers as their
heartbeats tell (``watch``), the scheduler's figures since the client's last poll and the
re-plans timeline (``history``), the dead queue's depth and its messages' reasons, and the Batch
API's batches. Reasons and batches are read off the request path, at most every
``SLOW_READ_EVERY_S``, and served from the last read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from common.scheduling import schedule_records
from common.transport.dead import DeadQueue
from services.front import openai_api as oa
from services.front.core import Gateway
from services.gateway.admin import jsonable
from services.gateway.dashboard.history import History
from services.gateway.dashboard.watch import WorkerWatch

log = logging.getLogger(__name__)

SLOW_READ_EVERY_S = 10.0  # dead messages' reasons and batch progress: at most this often
DEAD_REASONS_MAX = 500  # deeper than this, the dead queue's reasons are not read (its depth still is)
BATCHES_SHOWN = 10
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The page runs only its own files: no inline script, nothing from another origin.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def static_file(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


class Dashboard:
    """The gateway's memory for its dashboard; made at start, listening only once asked."""

    def __init__(self, gateway: Gateway, app: FastAPI) -> None:
        self.gateway, self.app = gateway, app
        self.history = History()
        self.watch = WorkerWatch(
            gateway.bus, gateway.names, f"{gateway.gateway_id}-dashboard", gateway.config.heartbeat_timeout_s
        )
        self.dead_reasons: list[dict[str, Any]] = []
        self.dead_reasons_at: float | None = None
        self.batches: list[dict[str, Any]] | None = None
        self._dead_depth_read: int | None = None
        self.reading_at = float("-inf")
        self.reading: asyncio.Task[None] | None = None  # the slow read under way (tests await it)

    async def close(self) -> None:
        if self.reading is not None:
            self.reading.cancel()
            await asyncio.gather(self.reading, return_exceptions=True)
        await self.watch.close()

    async def snapshot(self, since: float, after_seq: int) -> dict[str, Any]:
        await self.watch.ensure_started()
        gateway, loop = self.gateway, asyncio.get_running_loop()
        update, state = await schedule_records(gateway.transports.store, gateway.names)
        update_json, state_json = jsonable(update), jsonable(state)
        now = time.time()
        self.history.observe(update_json, state_json, now)
        depth = await gateway.bus.queue_depth(gateway.names.dead_queue)
        self._maybe_read_slowly(depth, loop.time())
        workers = self.watch.rows(loop.time())
        self._add_embedded(workers)
        return {
            "now": now,
            "gateway": {
                "id": gateway.gateway_id,
                "model": gateway.model,
                "namespace": gateway.names.namespace,
                "in_flight": len(gateway.pending),
                "embedded": self._mesh() is not None,
                "heartbeat_timeout_s": gateway.config.heartbeat_timeout_s,
            },
            "update": update_json,
            "state": state_json,
            "workers": workers,
            "dead": {"depth": depth, "reasons": self.dead_reasons, "reasons_at": self.dead_reasons_at},
            "batches": self.batches,
            "history": self.history.points_after(since),
            "timeline": self.history.timeline_after(after_seq),
        }

    def _mesh(self) -> Any:
        return getattr(self.app.state, "mesh", None)

    def _add_embedded(self, rows: list[dict[str, Any]]) -> None:
        """``exegpt serve``: the workers are in this process, so their KV cache use is read as it is
        now (a heartbeat's is up to ``heartbeat_s`` old)."""
        mesh = self._mesh()
        if mesh is None:
            return
        by_id = {w.worker_id: w for w in mesh.workers}
        for row in rows:
            worker = by_id.get(row["worker_id"])
            if worker is None:
                continue
            s = worker.metrics_state()
            row["kv_tokens"] = s.kv_tokens
            row["kv_used_bytes"] = s.kv_tokens * s.kv_bytes_per_token if s.kv_bytes_per_token else None
            row["kv_allocated_bytes"] = s.kv_allocated_bytes

    def _maybe_read_slowly(self, depth: int, now: float) -> None:
        if self.reading is not None or now - self.reading_at < SLOW_READ_EVERY_S:
            return
        self.reading_at = now
        self.reading = asyncio.create_task(self._read_slowly(depth))

    async def _read_slowly(self, depth: int) -> None:
        try:
            if depth != self._dead_depth_read:
                await self._read_dead(depth)
            await self._read_batches()
        except Exception as exc:  # the next poll shows the last read; the one after tries again
            log.warning("dashboard: slow read failed: %r", exc)
        finally:
            self.reading = None

    async def _read_dead(self, depth: int) -> None:
        """Count the dead messages' reasons: take them all and give them all back at once (what
        ``exegpt dlq list`` does), only while the queue is shallow enough."""
        if depth > DEAD_REASONS_MAX:
            self.dead_reasons, self.dead_reasons_at = [], None
            return
        dead = DeadQueue(self.gateway.bus, self.gateway.names)
        try:
            messages = await dead.take(timeout_s=1.0)
        finally:
            await dead.give_back()
        counts = Counter((m.queue, m.reason) for m in messages)
        self.dead_reasons = [{"queue": q, "reason": r, "count": n} for (q, r), n in counts.most_common()]
        self.dead_reasons_at, self._dead_depth_read = time.time(), depth

    async def _read_batches(self) -> None:
        """The newest Batch API batches and their request counts, when a plugin serves that API: it
        puts at ``app.state.batches`` an object whose ``newest(limit)`` gives them as the API does."""
        store = getattr(self.app.state, "batches", None)
        if store is None:
            return
        self.batches = [
            {"id": b["id"], "status": b["status"], "created_at": b["created_at"], **b["request_counts"]}
            for b in await store.newest(BATCHES_SHOWN)
        ]


def dashboard_router() -> APIRouter:
    router = APIRouter()

    @router.get("/dashboard", include_in_schema=False)
    async def page() -> Response:
        return Response(static_file("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @router.get("/dashboard/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in STATIC:
            return JSONResponse(oa.error_body(f"no file {name}"), 404)
        return Response(static_file(name), media_type=STATIC[name], headers=PAGE_HEADERS)

    @router.get("/admin/dashboard/state", responses=oa.error_responses(400, 401, 403, 503))
    async def state(request: Request, since: float = 0.0, after: int = 0) -> JSONResponse:
        """Everything the dashboard shows; ``since``: only figures sampled after this unix time,
        ``after``: only timeline entries numbered above this (what the page already has)."""
        dashboard: Dashboard = request.app.state.dashboard
        return JSONResponse(await dashboard.snapshot(since, after))

    return router
