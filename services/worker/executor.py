"""The engine side of a worker: runs a StepPlan on the engine, on the engine's own thread.

The plan's ``admit`` requests are imported, then one ``engine.step`` prefills ``encode``,
advances ``decode``, pays for ``padding`` and runs the prompt ``chunks`` (mixed steps, in the same
forward pass); an encoder then exports what it prefilled. Engine
calls run one at a time on a dedicated thread (``services.run.engines.EngineRunner``), so the event
loop keeps receiving and publishing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.api import Engine, EngineBroken, GenerationRequest, KVHandoff, PromptChunk, RequestRejected, TokenEvent
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
    others (the step is retried without it). ``prompts`` holds the encoded requests and the
    chunked ones."""
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
    chunks = [PromptChunk(prompts[c.request_id], c.start, c.length) for c in plan.chunks]
    result.events = _step_refusing(engine, new, decode, plan.padding, result.refused, chunks)
    if export:
        finished = {e.request_id for e in result.events if e.finished}
        for request in new:
            if request.request_id not in finished and request.request_id not in result.refused:
                result.exported[request.request_id] = engine.export_request(request.request_id)
    return result


def _step_refusing(engine: Engine, new: list[GenerationRequest], decode: list[str], padding: int,
                   refused: dict[str, str], chunks: list[PromptChunk]) -> list[TokenEvent]:
    """The step, without the new requests the engine refuses: each refusal that names a new
    request or chunk (``RequestRejected``) refuses it and the step runs again without it (a
    refused step changed nothing); any other ``ValueError`` falls back to each prompt alone."""
    while True:
        try:
            more = (chunks,) if chunks else ()  # engines without chunked prefill take three arguments
            return engine.step(new, decode, padding, *more)
        except ValueError as exc:
            rid = exc.request_id if isinstance(exc, RequestRejected) else None
            if rid not in {r.request_id for r in new} | {c.request.request_id for c in chunks}:
                return _step_without_refused(engine, new, decode, padding, refused, chunks)
            refused[rid] = str(exc)
            new = [r for r in new if r.request_id != rid]
            chunks = _without(chunks, rid, engine)


def _without(chunks: list[PromptChunk], request_id: str, engine: Engine) -> list[PromptChunk]:
    """``chunks`` less the refused request's; the part of its prompt already in the cache goes."""
    if any(c.request.request_id == request_id and c.start > 0 for c in chunks):
        engine.abort(request_id)
    return [c for c in chunks if c.request.request_id != request_id]


def _step_without_refused(engine: Engine, new: list[GenerationRequest], decode: list[str], padding: int,
                          refused: dict[str, str], chunks: list[PromptChunk] = ()) -> list[TokenEvent]:
    """Each new prompt and each chunk alone (those the engine refuses are refused), then the decode."""
    events: list[TokenEvent] = []
    for request in new:
        try:
            events += engine.step([request])
        except ValueError as exc:
            refused[request.request_id] = str(exc)
    for chunk in chunks:
        try:
            events += engine.step(chunks=[chunk])
        except ValueError as exc:
            refused[chunk.request.request_id] = str(exc)
            engine.abort(chunk.request.request_id)  # the part of its prompt already in the cache
    return events + engine.step((), decode, padding)
