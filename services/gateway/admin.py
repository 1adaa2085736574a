"""The scheduler's admin API, mounted in every gateway under ``/admin`` (keys of scope admin).

    GET  /admin/schedule           the current ScheduleUpdate and the scheduler's SchedulerState
    PUT  /admin/schedule/bound     {"latency_bound_s": seconds | null}  -> SetBound   (202)
    PUT  /admin/schedule/slo       {"ttft_s", "ttft_percentile", "tpot_s", "tpot_percentile"} -> SetSlo (202)
    POST /admin/schedule/replan    {"reason": text} (optional)          -> Replan     (202)
    PUT  /admin/schedule/pin       {"schedule": {Schedule fields} | null} -> PinSchedule (202)

Reads come from the store; requests go to the scheduler's queue (it acts on them when it takes
them). JSON cannot hold infinity: infinite floats read as null (an unbounded latency).
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, create_model

from common.messages.control import PinSchedule, Replan, SetBound, SetSlo
from common.scheduling import ask_scheduler, schedule_records
from optimizer.schedule import MINIMUMS, Schedule
from services.front import openai_api as oa
from services.front.core import Gateway
from services.schedules import wire_schedule


class BoundBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # required; null: no bound
    latency_bound_s: StrictFloat | None = Field(..., json_schema_extra={"exclusiveMinimum": 0})


class SloBody(BaseModel):
    """TTFT and TPOT bounds in seconds (null: that bound not in force), each at a percentile
    (a fraction: 0.99 is p99). The end-to-end bound is PUT /admin/schedule/bound's."""

    model_config = ConfigDict(extra="forbid")
    ttft_s: StrictFloat | None = Field(..., json_schema_extra={"exclusiveMinimum": 0})
    ttft_percentile: StrictFloat = Field(0.99, ge=0.5, lt=1)
    tpot_s: StrictFloat | None = Field(..., json_schema_extra={"exclusiveMinimum": 0})
    tpot_percentile: StrictFloat = Field(0.99, ge=0.5, lt=1)


class ReplanBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = ""


LARGEST_INT = 2**31 - 1  # a schedule's integers travel in msgpack; none needs more


def schedule_fields() -> type[BaseModel]:
    """The fields of ``optimizer.schedule.Schedule`` as a body: their types, defaults and least
    values, and no other field (what a pin's schema states is what ``Schedule`` takes)."""
    hints = typing.get_type_hints(Schedule)
    fields: dict[str, Any] = {
        f.name: (
            hints[f.name],
            Field(f.default, ge=MINIMUMS.get(f.name), le=LARGEST_INT if hints[f.name] is int else None),
        )
        for f in dataclasses.fields(Schedule)
    }
    return create_model(
        "ScheduleFields",
        __config__=ConfigDict(extra="forbid", strict=True, allow_inf_nan=False),
        __doc__="A schedule (optimizer.schedule.Schedule); mixed needs chunk_tokens > "
        "decode_batch, and worker_devices must divide each role's devices.",
        **fields,
    )


ScheduleFields = schedule_fields()


class PinBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schedule: ScheduleFields | None  # type: ignore[valid-type]  # required; null: unpin


def jsonable(value: Any) -> Any:
    """Dataclasses, tuples and floats as JSON can hold them (inf and nan: null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def bad_request(message: str, param: str) -> JSONResponse:
    return JSONResponse(oa.error_body(message, param=param), 400)


def admin_router() -> APIRouter:
    router = APIRouter(prefix="/admin")

    @router.get("/schedule", responses=oa.error_responses(401, 403, 503))
    async def schedule(request: Request) -> JSONResponse:
        gateway: Gateway = request.app.state.gateway
        update, state = await schedule_records(gateway.transports.store, gateway.names)
        return JSONResponse({"update": jsonable(update), "state": jsonable(state)})

    @router.put("/schedule/bound", status_code=202, responses=oa.error_responses(400, 401, 403, 408, 413, 503))
    async def set_bound(body: BoundBody, request: Request) -> JSONResponse:
        bound = body.latency_bound_s
        if bound is not None and not bound > 0:  # nan is not > 0 either
            return bad_request(
                f"latency_bound_s must be a positive number of seconds or null, got {bound}", "latency_bound_s"
            )
        message = SetBound(bound or math.inf, time.time())
        gateway: Gateway = request.app.state.gateway
        await ask_scheduler(gateway.bus, gateway.names, message)
        return JSONResponse({"requested": "set_bound", **jsonable(message)}, 202)

    @router.put("/schedule/slo", status_code=202, responses=oa.error_responses(400, 401, 403, 408, 413, 503))
    async def set_slo(body: SloBody, request: Request) -> JSONResponse:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(body, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                return bad_request(f"{name} must be a positive number of seconds or null, got {value}", name)
        message = SetSlo(
            body.ttft_s or math.inf, body.ttft_percentile, body.tpot_s or math.inf, body.tpot_percentile, time.time()
        )
        gateway: Gateway = request.app.state.gateway
        await ask_scheduler(gateway.bus, gateway.names, message)
        return JSONResponse({"requested": "set_slo", **jsonable(message)}, 202)

    @router.post("/schedule/replan", status_code=202, responses=oa.error_responses(400, 401, 403, 408, 413, 503))
    async def replan(request: Request, body: ReplanBody | None = None) -> JSONResponse:
        reason = (body.reason if body else "") or "requested through the admin API"
        message = Replan(reason, time.time())
        gateway: Gateway = request.app.state.gateway
        await ask_scheduler(gateway.bus, gateway.names, message)
        return JSONResponse({"requested": "replan", **jsonable(message)}, 202)

    @router.put("/schedule/pin", status_code=202, responses=oa.error_responses(400, 401, 403, 408, 413, 503))
    async def pin(body: PinBody, request: Request) -> JSONResponse:
        try:
            schedule = None if body.schedule is None else Schedule(**body.schedule.model_dump())
        except (TypeError, ValueError) as exc:
            return bad_request(f"not a schedule: {exc}", "schedule")
        gateway: Gateway = request.app.state.gateway
        requested_at = time.time()
        pin = PinSchedule(None if schedule is None else wire_schedule(schedule), requested_at)
        await ask_scheduler(gateway.bus, gateway.names, pin)
        return JSONResponse({"requested": "pin", "schedule": jsonable(schedule), "requested_at": requested_at}, 202)

    return router
