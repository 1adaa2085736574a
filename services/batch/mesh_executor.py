"""Running jobs through the mesh: submit like the gateway does, collect the tokens.

Jobs enter the encoders' work queue through a ``Gateway`` (its ``submit`` and ``Pending``), so
they are batched with interactive requests by the same policy. Each attempt gets a fresh request
id: a redelivered job must not be mistaken for its first attempt by the mesh's own dedupe.
"""

from __future__ import annotations

import uuid

from common.messages.jobs import BatchJob
from services.batch.executor import JobFailed, JobOutput, prompt_ids
from services.front.core import Gateway, Pending, RequestFailed, ServedModel


class MeshExecutor:
    def __init__(self, gateway: Gateway, model: ServedModel, timeout_s: float) -> None:
        self.gateway, self.model, self.timeout_s = gateway, model, timeout_s
        self._mine: dict[str, Pending] = {}

    def waiting(self) -> int:
        """This executor's requests that have not produced a first token (still queued or
        encoding): what the encode queue holds on batch work's behalf."""
        return sum(1 for p in self._mine.values() if p.next_index == 0)

    async def execute(self, job: BatchJob) -> JobOutput:
        if job.model != self.model.name:
            raise JobFailed(f"model {job.model!r} is not served here ({self.model.name!r})")
        ids = prompt_ids(job, self.model.tokenizer, self.model.max_context)
        rid = f"batch-{job.job_id}-{uuid.uuid4().hex[:8]}"
        pending = await self.gateway.submit(
            list(ids), job.sampling, request_id=rid, stream=False, timeout_s=self.timeout_s
        )
        self._mine[rid] = pending
        texts: list[str] = []
        reason = None
        try:
            async for token in pending.tokens():
                texts.append(token.text)
                reason = token.finish_reason
        except RequestFailed as exc:
            if 400 <= exc.status < 500:
                raise JobFailed(str(exc)) from None
            raise  # the mesh's trouble (timeout, engine error): the job is retried
        finally:
            self._mine.pop(rid, None)
            if not pending.done:
                await self.gateway.abort(pending)
        return JobOutput("".join(texts), reason, len(ids), pending.next_index)
