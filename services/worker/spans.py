"""A worker's trace spans: one per step when tracing is on, and each request's decode span."""

from __future__ import annotations

from optimizer.policies import (
    StepPlan,
)
from services.worker.base import WorkerBase
from services.worker.executor import StepResult
from services.worker.requests import Held


class StepSpans(WorkerBase):
    """Methods of ``services.worker.worker.Worker``: they use its state."""

    def _trace_step(self, plan: StepPlan, result: StepResult) -> None:
        """The step's spans, once per request (never per token): an encode span for each request it
        prefilled; a decode span opens for each request that starts decoding, and closes for each
        that finished or failed in it."""
        gone = {**result.refused, **result.failed, **{rid: "engine fault: given back" for rid in result.given_back}}
        for rid in plan.first_tokens:
            held = self.held[rid]
            held.trace = self.tracing.record(
                "encode",
                parent=held.trace,
                start_s=held.encode_start_at,
                end_s=result.ended_at,
                kind="consumer",
                attributes={
                    **(self._span_attributes(held) or {}),
                    "exegpt.batch_size": len(plan.first_tokens),
                    "exegpt.prompt_tokens": held.input_len,
                },
                error=gone.get(rid),
            )
        decoding = (*plan.admit, *(plan.first_tokens if self.role != "encoder" else ()))
        for rid in decoding:
            starts = self.held.get(rid)
            if starts is not None and rid not in gone and rid not in result.exported:
                starts.decode_span = self.tracing.start(
                    "decode", parent=starts.trace, start_s=result.ended_at, attributes=self._span_attributes(starts)
                )
                starts.trace = self.tracing.context_of(starts.decode_span)
        for event in result.events:
            if event.finished:
                self._end_decode_span(self.held[event.request_id], event.finish_reason or "stop", result.ended_at)
        for rid, why in gone.items():
            self._end_decode_span(self.held[rid], "failed", result.ended_at, error=why)

    def _span_attributes(self, held: Held) -> dict[str, str | int] | None:
        if not self.tracing.enabled:
            return None
        return {
            "exegpt.request_id": held.request_id,
            "exegpt.worker_id": self.worker_id,
            "exegpt.role": self.role,
            "exegpt.schedule_version": self.follower.version,
        }

    def _end_decode_span(self, held: Held, outcome: str, at: float | None = None, *, error: str | None = None) -> None:
        if held.decode_span is not None:
            self.tracing.end(
                held.decode_span,
                end_s=at,
                error=error,
                attributes={"exegpt.outcome": outcome, "exegpt.output_tokens": len(held.generated)},
            )
            held.decode_span = None
