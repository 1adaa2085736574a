"""The engine side of a worker: runs a StepPlan on the engine, on the engine's own thread.

The plan's ``admit`` requests are imported, then one ``engine.step`` prefills ``encode``,
advances ``decode``, pays for ``padding`` and runs the prompt ``chunks`` (mixed steps, in the same
forward pass); an encoder then exports what it prefilled. Engine
calls run one at a time on a dedicated thread (``services.hosting.engines.EngineRunner``), so the event
loop keeps receiving and publishing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.api import Engine, EngineBroken, GenerationRequest, KVHandoff, PromptChunk, RequestRejected, TokenEvent
from optimizer.policies import StepPlan


@dataclass(frozen=True)
class Finished:
    """Generated to its end (``reason``: "stop", "length", ...): it settles."""

    request_id: str
    reason: str


@dataclass(frozen=True)
class Refused:
    """Its prompt or hand-off was refused by the engine (``why``): bad input (400) or a hand-off (500)."""

    request_id: str
    why: str


@dataclass(frozen=True)
class Failed:
    """An engine fault at its last attempt (``why``): it fails (500)."""

    request_id: str
    why: str


@dataclass(frozen=True)
class GivenBack:
    """An engine fault before its last attempt: back to its queue, another worker may run it."""

    request_id: str


@dataclass(frozen=True)
class HandedOff:
    """Prefilled on an encoder: its KV cache goes to a decoder."""

    request_id: str
    handoff: KVHandoff


Exit = Finished | Refused | Failed | GivenBack | HandedOff


@dataclass
class StepResult:
    events: list[TokenEvent] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # request id -> why (prompt or hand-off)
    failed: dict[str, str] = field(default_factory=dict)  # an engine fault, the second time: 500
    given_back: list[str] = field(default_factory=list)  # an engine fault, the first time: requeued
    faulted: dict[str, str] = field(default_factory=dict)  # a new request its step faulted on (the worker
    # gives it back, or fails it at its last attempt); the step's other requests went on
    exported: dict[str, KVHandoff] = field(default_factory=dict)  # encoder: prefilled, to hand off
    started_at: float = 0.0
    ended_at: float = 0.0

    def exits(self) -> list[Exit]:
        """The requests that leave the worker after this step, each once, with how: finished,
        refused, failed, given back, handed off (in that order)."""
        return [
            *(Finished(e.request_id, e.finish_reason or "stop") for e in self.events if e.finished),
            *(Refused(rid, why) for rid, why in self.refused.items()),
            *(Failed(rid, why) for rid, why in self.failed.items()),
            *(GivenBack(rid) for rid in self.given_back),
            *(HandedOff(rid, handoff) for rid, handoff in self.exported.items()),
        ]


def run_step(
    engine: Engine,
    plan: StepPlan,
    prompts: dict[str, GenerationRequest],
    handoffs: dict[str, KVHandoff],
    export: Callable[[int], Any] | None,
) -> StepResult:
    """On the engine thread: the whole plan. A refused prompt or hand-off does not stop the
    others (the step is retried without it), nor does a new request whose step faults (it is
    found by running the others without it). ``prompts`` holds the encoded requests and the
    chunked ones. ``export``: an encoder's, what the KV transport gives to export into
    (``KvTransport.export_buffer``)."""
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
    result.events = _step_refusing(engine, Joining(new, chunks), decode, plan.padding, result)
    if export is not None:
        finished = {e.request_id for e in result.events if e.finished}
        for request in new:
            rid = request.request_id
            if rid not in finished and rid not in result.refused and rid not in result.faulted:
                result.exported[rid] = engine.export_request(rid, export)
    return result


@dataclass
class Joining:
    """A step's new requests: whole prompts and prompt chunks."""

    new: list[GenerationRequest]
    chunks: list[PromptChunk]

    def ids(self) -> set[str]:
        return {r.request_id for r in self.new} | {c.request.request_id for c in self.chunks}

    def without(self, request_id: str, engine: Engine) -> Joining:
        """Less ``request_id``; the part of its prompt a chunked prefill put in the cache goes."""
        if any(c.request.request_id == request_id and c.start > 0 for c in self.chunks):
            engine.abort(request_id)
        return Joining(
            [r for r in self.new if r.request_id != request_id],
            [c for c in self.chunks if c.request.request_id != request_id],
        )

    def alone(self) -> list[tuple[str, Joining]]:
        return [(r.request_id, Joining([r], [])) for r in self.new] + [
            (c.request.request_id, Joining([], [c])) for c in self.chunks
        ]


def _step(engine: Engine, joining: Joining, decode: list[str], padding: int) -> list[TokenEvent]:
    more = (joining.chunks,) if joining.chunks else ()  # engines without chunked prefill take three arguments
    return engine.step(joining.new, decode, padding, *more)


def _step_refusing(
    engine: Engine, joining: Joining, decode: list[str], padding: int, result: StepResult
) -> list[TokenEvent]:
    """The step, without the new requests the engine refuses: each refusal that names a new
    request or chunk (``RequestRejected``) refuses it and the step runs again without it (a
    refused step changed nothing). Any other failure of a step with new requests is looked for
    among them (``_one_by_one``)."""
    while True:
        try:
            return _step(engine, joining, decode, padding)
        except EngineBroken:
            raise
        except ValueError as exc:
            rid = exc.request_id if isinstance(exc, RequestRejected) else None
            if rid not in joining.ids():
                return _one_by_one(engine, joining, decode, padding, result, exc)
            result.refused[rid] = str(exc)
            joining = joining.without(rid, engine)
        except Exception as exc:
            if not joining.ids():
                raise  # the running requests' own step: an engine fault
            return _one_by_one(engine, joining, decode, padding, result, exc)


def _one_by_one(
    engine: Engine, joining: Joining, decode: list[str], padding: int, result: StepResult, exc: Exception
) -> list[TokenEvent]:
    """A step with new requests failed (and changed nothing): the running requests step without
    them (if that fails too, the fault is the engine's: it raises), then each new one alone. A
    ``ValueError`` refuses it; another failure is its fault (``faulted``). A single new request
    is not run again: the step without it succeeded, so it failed it."""
    events = engine.step((), decode, padding)
    suspects = joining.alone()
    if len(suspects) == 1 and not isinstance(exc, ValueError):
        _blame(result, suspects[0][0], exc, engine)
        return events
    for rid, one in suspects:
        try:
            events += _step(engine, one, [], 0)
        except EngineBroken:
            raise
        except Exception as fault:
            _blame(result, rid, fault, engine)
    return events


def _blame(result: StepResult, request_id: str, exc: Exception, engine: Engine) -> None:
    """``request_id``'s step failed with ``exc``: refused (its input) or faulted (the engine's
    failure on it); the part of its prompt a chunked prefill put in the cache goes."""
    engine.abort(request_id)
    if isinstance(exc, ValueError):
        result.refused[request_id] = str(exc)
    else:
        result.faulted[request_id] = f"{type(exc).__name__}: {exc}"
