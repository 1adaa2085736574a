"""The OpenAI Batch API's state: files, batches and their output, kept in the mesh's store.

A batch turns its input file's valid lines into jobs on the durable jobs queue (job ids
``{batch_id}-{k:06d}``); lines that fail validation go straight to the error file. Its status,
counts and output file are derived from the jobs' stored results whenever asked, so each
request appears exactly once in the output, however often its job ran.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from common.transport.port import Bus, Store
from common.messages.jobs import JobResult
from common.names import BATCHES_MAX, RESULT_TTL_S, Names
from services.batch.producer import JobProducer, job_id
from services.batch.requests import ENDPOINTS, InvalidRequest, parse_batch_line
from services.gateway import openai_api as oa


class BatchApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 100 * 1024 * 1024
    max_lines: int = 50_000
    max_tokens_limit: int = 4096


def _error_line(line_no: int, custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_line{line_no}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message, "line": line_no}}


class BatchStore:
    def __init__(self, bus: Bus, store: Store, names: Names, model: str, limits: Limits) -> None:
        self.bus, self.store, self.names, self.model, self.limits = bus, store, names, model, limits
        self.producer = JobProducer(bus, store, names)

    # --- files ----------------------------------------------------------------------------
    async def upload(self, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        if purpose != "batch":
            raise BatchApiError(400, f"purpose must be 'batch', got {purpose!r}", "purpose")
        if len(content) > self.limits.max_file_bytes:
            raise BatchApiError(413, f"file is {len(content)} bytes; the limit is "
                                f"{self.limits.max_file_bytes}", "file")
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        await self._put_file(file_id, filename, purpose, content)
        return await self.file_object(file_id)

    async def _put_file(self, file_id: str, filename: str, purpose: str, content: bytes) -> None:
        await self.store.set(self.names.file_content(file_id), content, ttl_s=RESULT_TTL_S)
        await self.store.hset(self.names.file_meta(file_id), {
            "filename": filename, "purpose": purpose, "bytes": str(len(content)),
            "created_at": str(int(time.time()))}, ttl_s=RESULT_TTL_S)

    async def file_object(self, file_id: str) -> dict[str, Any]:
        meta = await self.store.hgetall(self.names.file_meta(file_id))
        if not meta:
            generated = await self._generated(file_id)
            if generated is None:
                raise BatchApiError(404, f"no file {file_id}", "file_id")
            return {"id": file_id, "object": "file", "bytes": len(generated),
                    "created_at": int(time.time()), "filename": f"{file_id}.jsonl",
                    "purpose": "batch_output", "status": "processed"}
        return {"id": file_id, "object": "file", "bytes": int(meta["bytes"]),
                "created_at": int(meta["created_at"]), "filename": meta["filename"],
                "purpose": meta["purpose"], "status": "processed"}

    async def file_content(self, file_id: str) -> bytes:
        content = await self.store.get(self.names.file_content(file_id))
        if content is not None:
            return content
        generated = await self._generated(file_id)
        if generated is None:
            raise BatchApiError(404, f"no file {file_id}", "file_id")
        return generated

    async def _generated(self, file_id: str) -> bytes | None:
        """Output and error files of finished batches: ``file-{batch}-output|errors``."""
        for suffix, pick in (("-output", 0), ("-errors", 1)):
            if file_id.startswith("file-") and file_id.endswith(suffix):
                batch_id = file_id[len("file-"):-len(suffix)]
                meta = await self.store.hgetall(self.names.openai_batch(batch_id))
                if not meta:
                    return None
                lines = (await self._output_lines(batch_id, meta))[pick]
                return "".join(json.dumps(line) + "\n" for line in lines).encode()
        return None

    # --- batches --------------------------------------------------------------------------
    async def create(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise BatchApiError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}", "endpoint")
        if completion_window != "24h":
            raise BatchApiError(400, "completion_window must be '24h'", "completion_window")
        content = await self.store.get(self.names.file_content(input_file_id))
        if content is None:
            raise BatchApiError(404, f"no file {input_file_id}", "input_file_id")
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        jobs, valid, errors = self._parse(batch_id, content.decode("utf-8", "replace"), endpoint)
        await self.store.hset(self.names.openai_batch(batch_id), {
            "input_file_id": input_file_id, "endpoint": endpoint,
            "completion_window": completion_window, "created_at": str(int(time.time())),
            "metadata": json.dumps(metadata or {}), "total": str(len(valid) + len(errors)),
            "valid": json.dumps(valid), "invalid": json.dumps(errors)}, ttl_s=RESULT_TTL_S)
        await self.store.push_capped(self.names.openai_batches, batch_id.encode(), max_len=BATCHES_MAX)
        if jobs:
            await self.producer.submit(batch_id, jobs, reply_to=None)
        return await self.batch_object(batch_id)

    def _parse(self, batch_id: str, text: str, endpoint: str) -> tuple[list[Any], list[Any], list[Any]]:
        """Jobs of the valid lines, [line, custom_id] of each, and error lines of the rest."""
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            raise BatchApiError(400, "the input file has no requests", "input_file_id")
        if len(lines) > self.limits.max_lines:
            raise BatchApiError(400, f"{len(lines)} requests; a batch holds at most "
                                f"{self.limits.max_lines}", "input_file_id")
        jobs, valid, errors, seen = [], [], [], set()
        for n, line in lines:
            try:
                parsed = parse_batch_line(line, endpoint, self.model, self.limits.max_tokens_limit)
                if parsed.custom_id in seen:
                    raise InvalidRequest(f"duplicate custom_id {parsed.custom_id!r}")
                if parsed.model != self.model:
                    raise InvalidRequest(f"model {parsed.model!r} is not served here ({self.model!r})")
            except InvalidRequest as exc:
                custom_id = _custom_id_of(line)
                errors.append(_error_line(n, custom_id, "invalid_request", str(exc)))
                continue
            seen.add(parsed.custom_id)
            jobs.append(parsed.job(job_id(batch_id, len(jobs)), batch_id, None))
            valid.append([n, parsed.custom_id])
        return jobs, valid, errors

    async def batch_object(self, batch_id: str) -> dict[str, Any]:
        meta = await self.store.hgetall(self.names.openai_batch(batch_id))
        if not meta:
            raise BatchApiError(404, f"no batch {batch_id}", "batch_id")
        valid = json.loads(meta["valid"])
        invalid = json.loads(meta["invalid"])
        results = await self.producer.results(batch_id) if valid else []
        done = [r for r in results if r is not None]
        completed = sum(1 for r in done if r.status == "completed")
        failed = len(invalid) + sum(1 for r in done if r.status == "failed")
        cancel_requested = bool(valid) and (await self.producer.status(batch_id)).cancel_requested
        finished = len(done) == len(valid)
        last = int(max((r.finished_at for r in done), default=float(meta["created_at"])))
        if not valid:
            status = "failed"
        elif cancel_requested:
            status = "cancelled" if finished else "cancelling"
        else:
            status = "completed" if finished else "in_progress"
        has_errors = failed > 0 or any(r.status == "cancelled" for r in done)
        created = int(meta["created_at"])
        return {
            "id": batch_id, "object": "batch", "endpoint": meta["endpoint"],
            "errors": {"object": "list", "data": [{"code": "empty_batch", "message":
                       "no line of the input file is a valid request"}]} if not valid else None,
            "input_file_id": meta["input_file_id"], "completion_window": meta["completion_window"],
            "status": status,
            "output_file_id": f"file-{batch_id}-output" if finished and completed else None,
            "error_file_id": f"file-{batch_id}-errors" if finished and has_errors else None,
            "created_at": created, "in_progress_at": created if valid else None,
            "expires_at": created + 24 * 3600,
            "finalizing_at": last if finished and valid else None,
            "completed_at": last if status == "completed" else None,
            "failed_at": created if status == "failed" else None,
            "cancelling_at": created if cancel_requested else None,
            "cancelled_at": last if status == "cancelled" else None,
            "request_counts": {"total": int(meta["total"]), "completed": completed, "failed": failed},
            "metadata": json.loads(meta["metadata"]),
        }

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        meta = await self.store.hgetall(self.names.openai_batch(batch_id))
        if not meta:
            raise BatchApiError(404, f"no batch {batch_id}", "batch_id")
        if json.loads(meta["valid"]):
            await self.producer.cancel(batch_id)
        return await self.batch_object(batch_id)

    async def list(self, limit: int) -> dict[str, Any]:
        ids = [raw.decode() for raw in await self.store.list_range(self.names.openai_batches, limit)]
        data = [await self.batch_object(i) for i in ids]
        return {"object": "list", "data": data, "first_id": ids[0] if ids else None,
                "last_id": ids[-1] if ids else None, "has_more": False}

    async def _output_lines(self, batch_id: str, meta: dict[str, str]) -> tuple[list[Any], list[Any]]:
        """(output lines, error lines), each in input-line order."""
        valid = json.loads(meta["valid"])
        results = await self.producer.results(batch_id) if valid else []
        output: list[tuple[int, Any]] = []
        errors: list[tuple[int, Any]] = [(e["error"]["line"], e) for e in json.loads(meta["invalid"])]
        for (line_no, custom_id), result in zip(valid, results):
            if result is None:
                continue
            line = self._result_line(meta["endpoint"], custom_id, result)
            (output if result.status == "completed" else errors).append((line_no, line))
        return [line for _, line in sorted(output, key=lambda x: x[0])], \
               [line for _, line in sorted(errors, key=lambda x: x[0])]

    def _result_line(self, endpoint: str, custom_id: str, r: JobResult) -> dict[str, Any]:
        rid = f"batch_req_{r.job_id}"
        if r.status == "cancelled":
            return {"id": rid, "custom_id": custom_id, "response": None,
                    "error": {"code": "batch_cancelled", "message": r.error}}
        if r.status == "failed":
            body = oa.error_body(r.error or "failed")
            return {"id": rid, "custom_id": custom_id,
                    "response": {"status_code": 400, "request_id": r.job_id, "body": body},
                    "error": None}
        shape = oa.chat_completion if ENDPOINTS[endpoint] == "chat" else oa.completion
        body = shape(r.job_id, self.model, r.text, r.finish_reason,
                     oa.usage(r.prompt_tokens, r.completion_tokens))
        body["created"] = int(r.finished_at)
        return {"id": rid, "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": r.job_id, "body": body},
                "error": None}


def _custom_id_of(line: str) -> str | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    return custom_id if isinstance(custom_id, str) else None
