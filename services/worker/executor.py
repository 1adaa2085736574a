"""The engine side of a worker: runs a StepPlan on the engine, on the engine's own thread.

The plan's ``admit`` requests are imported, then one ``engine.step`` prefills ``encode``,
advances ``decode`` and pays for ``padding``; an encoder then exports what it prefilled. Engine
calls run one at a time on a dedicated thread (``services.engines.EngineRunner``), so the event
loop keeps receiving and publishing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.api import Engine, EngineBroken, GenerationRequest, KVHandoff, TokenEvent
from optimizer.policies import StepPlan


@dataclass
class StepResult:
    events: list[TokenEvent] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # request id -> why (prompt or hand-off)
    failed: dict[str, str] = field(default_factory=dict)  # an engine fault, the second time: 500
    given_back: list[str] = field(default_factory=list)  # an engine fault, the first time: requeued
    exported: dict[str, KVHandoff] = field(default_factory=dict)  # encoder: prefilled, to hand off
    started_at: float = 0.0
    ended_at: float = 0.0


def run_step(engine: Engine, plan: StepPlan, prompts: dict[str, GenerationRequest],
             handoffs: dict[str, KVHandoff], export: bool) -> StepResult:
    """On the engine thread: the whole plan. A refused prompt or hand-off does not stop the
    others (the step is retried without it)."""
    result = StepResult()
    for rid in plan.admit:
        try:
            engine.import_request(handoffs[rid])
        except EngineBroken:
            raise
        except Exception as exc:  # another model, bad bytes: this hand-off alone fails
            result.refused[rid] = f"hand-off refused: {exc}"
    decode = [rid for rid in plan.decode if rid not in result.refused]
    new = [prompts[rid] for rid in plan.encode]
    try:
        result.events = engine.step(new, decode, plan.padding)
    except ValueError:  # a prompt the engine refuses; find it, run the rest
        result.events = _step_without_refused(engine, new, decode, plan.padding, result.refused)
    if export:
        finished = {e.request_id for e in result.events if e.finished}
        for request in new:
            if request.request_id not in finished and request.request_id not in result.refused:
                result.exported[request.request_id] = engine.export_request(request.request_id)
    return result


def _step_without_refused(engine: Engine, new: list[GenerationRequest], decode: list[str], padding: int,
                          refused: dict[str, str]) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    for request in new:
        try:
            events += engine.step([request])
        except ValueError as exc:
            refused[request.request_id] = str(exc)
    return events + engine.step((), decode, padding)
