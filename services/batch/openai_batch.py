"""The OpenAI Batch API's state: files, batches and their output, kept in the batch folder.

A batch turns its input file's valid lines into jobs on the durable jobs queue (job ids
``{batch_id}-{k:06d}``); lines that fail validation go straight to the error file. Its status,
counts and output file are derived from the jobs' stored results whenever asked, so each
request appears exactly once in the output, however often its job ran.

Every file and batch has an owner (the API key's; ``ANONYMOUS`` without keys). The output and
error files get random ids when their batch is created (recorded with the batch and as file
records naming it), so they cannot be guessed from the batch id; they exist once the batch
object names them.

Files, records and results live in the batch folder (``BatchDir``), which losing the store does not
touch; the store holds only an index: each batch's owner (``names.openai_batch``) and the listings,
newest first. The listings are rebuilt from the folder when their marker is gone (a store that lost
its data), and a batch found in the folder without its index entry gets it back. A batch the index
or the folder still knows but whose record is gone answers 410 ``batch_state_lost``, not 404.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from common.jobs import BatchStateLost, JobProducer, UnknownBatch, job_id
from common.messages.jobs import JobResult
from common.names import BATCHES_MAX, RESULT_TTL_S, Names
from common.transport.batchdir import BatchDir
from common.transport.port import Bus, Store
from services.batch.requests import ENDPOINTS, InvalidRequest, parse_batch_line
from services.front import openai_api as oa


class BatchApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


MAX_FILE_BYTES_DEFAULT = 50 * 1024 * 1024  # files live in Redis (memory, one value each)
MAX_LINES_DEFAULT = 50_000  # OpenAI's limit of requests per batch
MAX_FILE_BYTES_ENV = "EXEGPT_BATCH_MAX_FILE_BYTES"
MAX_LINES_ENV = "EXEGPT_BATCH_MAX_LINES"
METADATA_MAX_PAIRS, METADATA_KEY_MAX, METADATA_VALUE_MAX = 16, 64, 512  # OpenAI's limits


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


@dataclass(frozen=True)
class Limits:
    """Upload and batch limits; the defaults can be overridden by ``EXEGPT_BATCH_MAX_FILE_BYTES``
    and ``EXEGPT_BATCH_MAX_LINES`` (read when the limits are made, i.e. at gateway start)."""

    max_file_bytes: int = field(default_factory=lambda: _env_int(MAX_FILE_BYTES_ENV, MAX_FILE_BYTES_DEFAULT))
    max_lines: int = field(default_factory=lambda: _env_int(MAX_LINES_ENV, MAX_LINES_DEFAULT))
    max_tokens_limit: int = 4096


ANONYMOUS = ""  # the owner of everything made without an API key (no keys-file owner is empty)


@dataclass(frozen=True)
class Caller:
    """Who calls: the owner of the API key (``ANONYMOUS`` on a gateway without keys), and whether
    the key has the admin scope (it sees and may cancel every owner's batches and files)."""

    owner: str = ANONYMOUS
    admin: bool = False

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.owner


def _error_line(line_no: int, custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_line{line_no}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "line": line_no},
    }


def _new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"  # 96 random bits: not guessable from anything


class BatchStore:
    """Files and batches, each with an owner. A caller that may not see one gets the same 404 as
    for an id that does not exist (existence is not revealed)."""

    def __init__(self, bus: Bus, store: Store, data: BatchDir, names: Names, model: str, limits: Limits) -> None:
        self.bus, self.store, self.data, self.names = bus, store, data, names
        self.model, self.limits = model, limits
        self.producer = JobProducer(bus, data, names)

    def owner_batches(self, owner: str) -> str:
        """List of one owner's batch ids, newest first, capped at BATCHES_MAX."""
        return f"{self.names.openai_batches}:owner:{hashlib.sha256(owner.encode()).hexdigest()[:32]}"

    # --- files ----------------------------------------------------------------------------
    async def upload(self, filename: str, purpose: str, content: bytes, *, caller: Caller) -> dict[str, Any]:
        if purpose != "batch":
            raise BatchApiError(400, f"purpose must be 'batch', got {purpose!r}", "purpose")
        if len(content) > self.limits.max_file_bytes:
            raise too_large(self.limits.max_file_bytes)
        lines = _count_lines(content, self.limits.max_lines)
        if lines > self.limits.max_lines:
            raise BatchApiError(
                400,
                f"the file has more than {self.limits.max_lines} requests "
                "(non-empty lines); split it into several batches",
                "file",
                "too_many_lines",
            )
        file_id = _new_file_id()
        await self.data.put_file(
            file_id,
            content,
            {
                "filename": filename,
                "purpose": purpose,
                "bytes": str(len(content)),
                "created_at": str(int(time.time())),
                "owner": caller.owner,
            },
        )
        return await self.file_object(file_id, caller=caller)

    async def _file_meta(self, file_id: str, caller: Caller) -> dict[str, str]:
        """The file's record if ``caller`` may see it, else a 404."""
        meta = await self.data.file_meta(file_id)
        if not meta or not caller.may_see(meta.get("owner", ANONYMOUS)):
            raise BatchApiError(404, f"no file {file_id}", "file_id")
        return meta

    async def file_object(self, file_id: str, *, caller: Caller) -> dict[str, Any]:
        meta = await self._file_meta(file_id, caller)
        if "batch_id" in meta:
            size = len(await self._generated(file_id, meta))
        else:
            size = int(meta["bytes"])
        return {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(meta["created_at"]),
            "filename": meta["filename"],
            "purpose": meta["purpose"],
            "status": "processed",
        }

    async def file_content(self, file_id: str, *, caller: Caller) -> bytes:
        meta = await self._file_meta(file_id, caller)
        if "batch_id" in meta:
            return await self._generated(file_id, meta)
        content = await self.data.file_content(file_id)
        if content is None:
            raise BatchApiError(404, f"no file {file_id}", "file_id")
        return content

    async def _generated(self, file_id: str, meta: dict[str, str]) -> bytes:
        """A batch's output or error file; it exists once the batch object names it."""
        batch_id = meta["batch_id"]
        batch = await self.data.record(batch_id, "openai.json")
        if not batch:
            raise BatchApiError(404, f"no file {file_id}", "file_id")
        results = await self._results(batch_id, batch)
        described = await self._describe(batch_id, batch, results)
        key = "output_file_id" if meta["kind"] == "output" else "error_file_id"
        if described[key] != file_id:
            raise BatchApiError(404, f"no file {file_id} (the batch has not produced it)", "file_id")
        lines = self._output_lines(batch, results)[0 if meta["kind"] == "output" else 1]
        return "".join(json.dumps(line) + "\n" for line in lines).encode()

    # --- batches --------------------------------------------------------------------------
    async def create(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        *,
        caller: Caller,
    ) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise BatchApiError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}", "endpoint")
        if completion_window != "24h":
            raise BatchApiError(400, "completion_window must be '24h'", "completion_window")
        _check_metadata(metadata)
        try:
            file_meta = await self._file_meta(input_file_id, caller)
        except BatchApiError:
            raise BatchApiError(404, f"no file {input_file_id}", "input_file_id") from None
        if file_meta.get("purpose") != "batch":
            raise BatchApiError(
                400,
                f"file {input_file_id} has purpose {file_meta.get('purpose')!r}; a batch's input needs purpose 'batch'",
                "input_file_id",
            )
        content = await self.data.file_content(input_file_id)
        if content is None:
            raise BatchApiError(404, f"no file {input_file_id}", "input_file_id")
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        jobs, valid, errors = self._parse(batch_id, content.decode("utf-8", "replace"), endpoint)
        created = str(int(time.time()))
        output_file_id, error_file_id = _new_file_id(), _new_file_id()
        for file_id, kind in ((output_file_id, "output"), (error_file_id, "errors")):
            await self.data.put_file_meta(
                file_id,
                {
                    "owner": caller.owner,
                    "batch_id": batch_id,
                    "kind": kind,
                    "purpose": "batch_output",
                    "filename": f"{batch_id}_{kind}.jsonl",
                    "created_at": created,
                },
            )
        await self.data.put_record(
            batch_id,
            "openai.json",
            {
                "input_file_id": input_file_id,
                "endpoint": endpoint,
                "owner": caller.owner,
                "completion_window": completion_window,
                "created_at": created,
                "created_ns": time.time_ns(),  # orders the listings when they are rebuilt
                "metadata": metadata or {},
                "total": len(valid) + len(errors),
                "output_file_id": output_file_id,
                "error_file_id": error_file_id,
                "valid": valid,
                "invalid": errors,
            },
        )
        await self._index(batch_id, caller.owner)
        if jobs:
            await self.producer.submit(batch_id, jobs, reply_to=None)
        return await self.batch_object(batch_id, caller=caller)

    def _parse(self, batch_id: str, text: str, endpoint: str) -> tuple[list[Any], list[Any], list[Any]]:
        """Jobs of the valid lines, [line, custom_id] of each, and error lines of the rest."""
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            raise BatchApiError(400, "the input file has no requests", "input_file_id")
        if len(lines) > self.limits.max_lines:
            raise BatchApiError(
                400,
                f"{len(lines)} requests; a batch holds at most {self.limits.max_lines}",
                "input_file_id",
                "too_many_lines",
            )
        jobs: list[Any] = []
        valid, errors, seen = [], [], set()
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

    # --- the index in the store ---------------------------------------------------------------
    async def _index(self, batch_id: str, owner: str) -> None:
        """The batch's index entry (its owner) and its place at the head of the listings."""
        await self.store.hset(self.names.openai_batch(batch_id), {"owner": owner}, ttl_s=RESULT_TTL_S)
        await self.store.push_capped(self.names.openai_batches, batch_id.encode(), max_len=BATCHES_MAX)
        await self.store.push_capped(self.owner_batches(owner), batch_id.encode(), max_len=BATCHES_MAX)

    async def rebuild_index(self) -> int:
        """The listings and index entries again from the batch folder (a store that lost its data
        lost them); the number of batches indexed."""
        found = []
        for batch_id in await self.data.batch_ids():
            record = await self.data.record(batch_id, "openai.json")
            if record is not None:
                found.append((record.get("created_ns", 0), batch_id, record.get("owner", ANONYMOUS)))
        found.sort()
        await self.store.delete(self.names.openai_batches, *{self.owner_batches(o) for _, _, o in found})
        for _, batch_id, owner in found:
            await self._index(batch_id, owner)
        await self.store.set(self.names.openai_batches_built, str(time.time()).encode())
        return len(found)

    async def _batch_meta(self, batch_id: str, caller: Caller) -> dict[str, Any]:
        """The batch's record if ``caller`` may see it; a 404 if nothing of it is known, a 410 if
        something is (an index entry, results) but the record is gone."""
        record = await self.data.record(batch_id, "openai.json")
        if record is not None:
            if not caller.may_see(record.get("owner", ANONYMOUS)):
                raise BatchApiError(404, f"no batch {batch_id}", "batch_id")
            if not await self.store.hgetall(self.names.openai_batch(batch_id)):
                await self.store.hset(
                    self.names.openai_batch(batch_id), {"owner": record.get("owner", ANONYMOUS)}, ttl_s=RESULT_TTL_S
                )
            return record
        entry = await self.store.hgetall(self.names.openai_batch(batch_id))
        if entry:  # indexed, so it was created: its record is lost (the folder was not shared, or wiped)
            if caller.may_see(entry.get("owner", ANONYMOUS)):
                raise self._lost(batch_id, len(await self.data.results(batch_id)))
        elif caller.admin and await self.data.known(batch_id):  # results kept, owner unknown
            raise self._lost(batch_id, len(await self.data.results(batch_id)))
        raise BatchApiError(404, f"no batch {batch_id}", "batch_id")

    @staticmethod
    def _lost(batch_id: str, results_kept: int) -> BatchApiError:
        return BatchApiError(410, str(BatchStateLost(batch_id, results_kept)), "batch_id", "batch_state_lost")

    async def _results(self, batch_id: str, meta: dict[str, Any]) -> list[JobResult | None]:
        """Each valid line's stored result, in order (None while it has none)."""
        if not meta["valid"]:
            return []
        try:
            return await self.producer.results(batch_id)
        except (BatchStateLost, UnknownBatch):  # the queue's record of it is gone
            raise self._lost(batch_id, len(await self.data.results(batch_id))) from None

    async def batch_object(self, batch_id: str, *, caller: Caller) -> dict[str, Any]:
        meta = await self._batch_meta(batch_id, caller)
        return await self._describe(batch_id, meta, await self._results(batch_id, meta))

    async def _describe(self, batch_id: str, meta: dict[str, Any], results: list[JobResult | None]) -> dict[str, Any]:
        valid, invalid = meta["valid"], meta["invalid"]
        done = [r for r in results if r is not None]
        completed = sum(1 for r in done if r.status == "completed")
        failed = len(invalid) + sum(1 for r in done if r.status == "failed")
        cancel_requested = bool(valid) and await self.data.cancelled(batch_id)
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
        output_file_id, error_file_id = meta["output_file_id"], meta["error_file_id"]
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": meta["endpoint"],
            "errors": {
                "object": "list",
                "data": [{"code": "empty_batch", "message": "no line of the input file is a valid request"}],
            }
            if not valid
            else None,
            "input_file_id": meta["input_file_id"],
            "completion_window": meta["completion_window"],
            "status": status,
            "output_file_id": output_file_id if finished and completed else None,
            "error_file_id": error_file_id if finished and has_errors else None,
            "created_at": created,
            "in_progress_at": created if valid else None,
            "expires_at": created + 24 * 3600,
            "finalizing_at": last if finished and valid else None,
            "completed_at": last if status == "completed" else None,
            "failed_at": created if status == "failed" else None,
            "cancelling_at": created if cancel_requested else None,
            "cancelled_at": last if status == "cancelled" else None,
            "request_counts": {"total": int(meta["total"]), "completed": completed, "failed": failed},
            "metadata": meta["metadata"],
        }

    async def cancel(self, batch_id: str, *, caller: Caller) -> dict[str, Any]:
        """Jobs not yet started finish as cancelled; a batch that already ended stays as it is."""
        meta = await self._batch_meta(batch_id, caller)
        described = await self._describe(batch_id, meta, await self._results(batch_id, meta))
        if described["status"] != "in_progress":
            return described
        await self.producer.cancel(batch_id)
        return await self.batch_object(batch_id, caller=caller)

    async def newest(self, limit: int) -> list[dict[str, Any]]:
        """Everyone's newest batches, for an operator's view (the gateway's dashboard)."""
        return (await self.list(limit, caller=Caller(admin=True)))["data"]

    def _output_lines(self, meta: dict[str, Any], results: list[JobResult | None]) -> tuple[list[Any], list[Any]]:
        """(output lines, error lines), each in input-line order."""
        valid = meta["valid"]
        output: list[tuple[int, Any]] = []
        errors: list[tuple[int, Any]] = [(e["error"]["line"], e) for e in meta["invalid"]]
        for (line_no, custom_id), result in zip(valid, results):
            if result is None:
                continue
            line = self._result_line(meta["endpoint"], custom_id, result)
            (output if result.status == "completed" else errors).append((line_no, line))
        return [line for _, line in sorted(output, key=lambda x: x[0])], [
            line for _, line in sorted(errors, key=lambda x: x[0])
        ]

    async def list(self, limit: int, *, caller: Caller) -> dict[str, Any]:
        """The caller's newest batches (an admin: everyone's); expired ones are left out."""
        if await self.store.get(self.names.openai_batches_built) is None:
            await self.rebuild_index()
        key = self.names.openai_batches if caller.admin else self.owner_batches(caller.owner)
        data = []
        for raw in await self.store.list_range(key, BATCHES_MAX):
            try:
                data.append(await self.batch_object(raw.decode(), caller=caller))
            except BatchApiError:  # expired (records live 7 days, the list longer), or lost
                continue
            if len(data) >= limit:
                break
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }

    def _result_line(self, endpoint: str, custom_id: str, r: JobResult) -> dict[str, Any]:
        rid = f"batch_req_{r.job_id}"
        if r.status == "cancelled":
            return {
                "id": rid,
                "custom_id": custom_id,
                "response": None,
                "error": {"code": "batch_cancelled", "message": r.error},
            }
        if r.status == "failed":
            body = oa.error_body(r.error or "failed")
            return {
                "id": rid,
                "custom_id": custom_id,
                "response": {"status_code": 400, "request_id": r.job_id, "body": body},
                "error": None,
            }
        shape = oa.chat_completion if ENDPOINTS[endpoint] == "chat" else oa.completion
        body = shape(r.job_id, self.model, r.text, r.finish_reason, oa.usage(r.prompt_tokens, r.completion_tokens))
        body["created"] = int(r.finished_at)
        return {
            "id": rid,
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": r.job_id, "body": body},
            "error": None,
        }


def too_large(limit: int) -> BatchApiError:
    return BatchApiError(
        413,
        f"the file is larger than the limit of {limit} bytes ({round(limit / 2**20, 2):g} MiB)",
        "file",
        "file_too_large",
    )


def _count_lines(content: bytes, max_lines: int) -> int:
    """Non-empty lines of ``content`` (exact when above ``max_lines``; cheap when far below)."""
    if content.count(b"\n") < max_lines:
        return 0 if not content.strip() else min(content.count(b"\n") + 1, max_lines)
    return sum(1 for line in content.splitlines() if line.strip())


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > METADATA_MAX_PAIRS:
        raise BatchApiError(400, f"metadata holds at most {METADATA_MAX_PAIRS} pairs", "metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_MAX or len(value) > METADATA_VALUE_MAX:
            raise BatchApiError(
                400,
                f"metadata keys are at most {METADATA_KEY_MAX} characters, values at most {METADATA_VALUE_MAX}",
                f"metadata.{key[:64]}",
            )


def _custom_id_of(line: str) -> str | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    return custom_id if isinstance(custom_id, str) else None
