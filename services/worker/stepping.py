"""A worker's step: the plan run on the engine, and what it gives out: tokens and stamps to the
submitters, and the requests that leave (a step's result lists them as typed exits, so one pass
says what each sends and how it goes); the step's costs for the scheduler's calibration and its
metrics."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import assert_never

from common.lifecycle import Stage
from common.messages.events import Failure
from engine.api import EngineBroken
from optimizer.driver import StepOutcome
from optimizer.policies import StepPlan, fused_steps
from services.hosting.threads import step_key
from services.worker.base import CREDIT_POLL_S, WorkerBase
from services.worker.costs import step_cost
from services.worker.executor import Failed, Finished, GivenBack, HandedOff, Refused, StepResult, run_step
from services.worker.exits import failed_task
from services.worker.mailbox import Outbox


class Stepping(WorkerBase):
    """Methods of ``services.worker.worker.Worker``: they use its state."""

    async def execute(self, plan: StepPlan) -> StepResult:
        await self._return_credits(plan)
        self._credit_wait = CREDIT_POLL_S[0]
        self._arrived: list[tuple[str, int]] = []  # queued since the last boundary (for the trace)
        chunked = tuple(c.request_id for c in plan.chunks)
        prompts = {rid: self.held[rid].generation_request() for rid in (*plan.encode, *chunked)}
        handoffs = {rid: self.held[rid].handoff for rid in plan.admit}
        started = time.time()
        for rid in (*plan.encode, *(c.request_id for c in plan.chunks if c.start == 0)):
            self.held[rid].encode_start_at = started
        if self.role == "encoder":  # each request it encodes used one of the credits it took
            for rid in plan.encode:
                self.held[rid].credit = True
        try:
            prompt_tokens = sum(len(prompts[rid].prompt_ids) for rid in plan.encode) + sum(
                c.length for c in plan.chunks
            )
            result = await self.runner.step(
                step_key(prompt_tokens, len(plan.decode) + len(plan.admit)),
                run_step,
                self.runner.engine,
                plan,
                prompts,
                handoffs,
                self.kv.export_buffer if self.role == "encoder" else None,
            )
        except EngineBroken:
            raise  # nothing more can run here: exit, and the broker redelivers what this worker held
        except Exception as exc:  # an engine fault: these requests run elsewhere once, then fail
            result = await self._step_failed(plan, exc)
        for rid in plan.admit:  # imported into the cache (or gone): its received KV bytes are not read again
            if (held := self.held.get(rid)) is not None and held.handoff is not None:
                held.handoff = replace(held.handoff, kv=b"")
        for rid, why in result.faulted.items():  # the step went on without them
            self._fault(result, rid, f"engine fault: {why}")
        result.started_at, result.ended_at = started, time.time()
        self.steps += 1
        self.engine_s += result.ended_at - started
        self.max_batch_seen = max(self.max_batch_seen, len(plan.decode))
        self._count(plan, result)
        self._note_cost(plan, result)
        return result

    def _note_cost(self, plan: StepPlan, result: StepResult) -> None:
        """The step's shape and seconds, for the scheduler's calibration (steps that failed say
        nothing about the engine's speed). A worker of role "worker" reports the interval the step
        took in the loop: from the previous step's end when the loop went straight on from it
        (what the boundary in between cost, tokens sent and work taken, is part of running
        back-to-back steps, as the simulator runs them), else from its own start. An encoder or a
        decoder reports its engine step alone: the work around its steps is mostly the hand-off,
        which the simulator costs on the hand-off link, and it would otherwise enter the factors
        every policy's steps share."""
        since, self._busy_since = self._busy_since, result.ended_at
        if result.failed or result.given_back or result.refused:
            return
        d = self.driver
        decoded = (d.running.get(rid) or d.incoming.get(rid) for rid in plan.decode)
        contexts = [r.input_len + r.generated for r in decoded if r is not None]
        prompts = {rid: self.held[rid].input_len for rid in plan.encode if rid in self.held}
        start = result.started_at if since is None or self.role != "worker" else min(since, result.started_at)
        self.step_costs.note(
            step_cost(plan, prompts, contexts, fused_steps(d.policy.schedule), result.ended_at - start, result.ended_at)
        )

    def _count(self, plan: StepPlan, result: StepResult) -> None:
        outcomes = {
            "finished": sum(e.finished for e in result.events),
            "handed_off": len(result.exported),
            "given_back": len(result.given_back),
            "refused": len(result.refused),
            "failed": len(result.failed),
        }
        prompt_tokens = sum(self.held[rid].input_len for rid in plan.encode if rid in self.held) + sum(
            c.length for c in plan.chunks
        )
        self.metrics.step(plan, result.ended_at - result.started_at, prompt_tokens, len(result.events), outcomes)

    async def _step_failed(self, plan: StepPlan, exc: Exception) -> StepResult:
        """The engine failed a step: its requests leave the engine; each message goes back to the
        queue (another worker may run it), a counted attempt; at its last attempt it fails (500)."""
        result = StepResult()
        for rid in dict.fromkeys((*plan.encode, *(c.request_id for c in plan.chunks), *plan.admit, *plan.decode)):
            await self.runner.call(self.runner.engine.abort, rid)
            self._fault(result, rid, f"engine fault: {exc}")
        return result

    def _fault(self, result: StepResult, rid: str, why: str) -> None:
        """An engine fault on ``rid``: back to the queue (another worker may run it), a counted
        attempt; at its last attempt it fails (500)."""
        held = self.held[rid]
        if held.delivery.attempts >= held.delivery.limit:
            result.failed[rid] = why
        else:
            result.given_back.append(rid)

    @staticmethod
    def outcome(result: StepResult) -> StepOutcome:
        exits = result.exits()
        return StepOutcome(
            tuple(e.request_id for e in exits if not isinstance(e, HandedOff)),
            tuple(e.request_id for e in exits if isinstance(e, HandedOff)),
        )

    # ==== emit ===================================================================================
    async def emit(self, plan: StepPlan, result: StepResult) -> None:
        """Tokens and stamps to the submitters, then one pass over the requests that leave: what
        each adds to the events, and how it leaves (settled, refused, failed, given back, handed
        off) once its events are confirmed, in the background: the next step does not wait."""
        outbox, self._next_stamps = self._next_stamps, Outbox()
        for rid in plan.first_tokens:  # prefilled: whole, or its last chunk
            held = self.held.get(rid)
            if held is None:  # a chunk the engine refused: it leaves below
                continue
            outbox.stamp(held.reply_to, rid, Stage.ENCODE_START, held.encode_start_at)
            outbox.stamp(held.reply_to, rid, Stage.ENCODE_END, result.ended_at)
        starts = plan.admit if self.role == "decoder" else plan.first_tokens  # a worker decodes what it encodes
        for rid in starts:
            if rid in self.held and rid not in result.refused and rid not in result.exported:
                outbox.stamp(self.held[rid].reply_to, rid, Stage.DECODE_START, result.ended_at)
        self._record_events(result, outbox)
        if self.tracing.enabled:
            self._trace_step(plan, result)
        published: list[asyncio.Task[None]] = []  # this step's events; filled before anything leaves
        leaving = []
        for exit in result.exits():
            rid, held = exit.request_id, self.held.pop(exit.request_id)
            match exit:
                case Finished(reason=reason):
                    leaving.append((self._settle(held, reason, published), held))
                case Refused(why=why):  # work: bad input, acked; a hand-off: to the dead queue
                    outbox.failure(held.reply_to, Failure(rid, 400 if held.handoff is None else 500, why))
                    leaving.append(
                        (self._refuse(held, published, None if held.handoff is None else f"refused: {why}"), held)
                    )
                case Failed(why=why):
                    outbox.failure(held.reply_to, Failure(rid, 500, why))
                    leaving.append((self._refuse(held, published, f"failed: {why}"), held))
                case GivenBack():
                    leaving.append((self._give_back(held), held))
                case HandedOff(handoff=handoff):
                    for token in held.flush():
                        outbox.token(held.reply_to, token)
                    outbox.stamp(held.reply_to, rid, Stage.HANDED_OFF, result.ended_at)
                    leaving.append((self._hand_off(held, handoff, published), held))
                case _:
                    assert_never(exit)
        published += self.send_soon(outbox)
        for rid in {e.request_id for e in result.events}:
            if (held := self.held.get(rid)) is not None:  # a failure stays seen
                held.sent = [t for t in held.sent if not t.done() or failed_task(t)] + published
        for work, held in leaving:
            self._keep(work, held)

    def _record_events(self, result: StepResult, outbox: Outbox) -> None:
        now = time.time()
        for event in result.events:
            held = self.held[event.request_id]
            if not held.first_token_at:
                held.first_token_at = now
            for token in held.record(event):
                outbox.token(held.reply_to, token)
