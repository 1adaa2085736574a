"""Batches that earlier versions kept in the store, moved into the batch folder once.

Earlier versions kept a batch's files, records and results in Redis (for 7 days). A gateway that
starts moves what it finds there into the batch folder (``adopt``) and leaves the store only the
index, so batches made before an upgrade answer as before. Moving again is harmless: records are
written the same, results only where none is stored, and the store's keys go once moved.
"""

from __future__ import annotations

import json
from typing import Any

from common.jobs import job_id
from common.names import RESULT_TTL_S, Names
from common.transport.batchdir import BatchDir, valid_id
from common.transport.port import Store
from services.batch.openai_batch import ANONYMOUS


async def adopt(store: Store, data: BatchDir, names: Names) -> int:
    """Move every batch and file the store still holds into ``data``; how many were moved."""
    moved = await _files(store, data, names) + await _queue_batches(store, data, names)
    moved += await _api_batches(store, data, names)
    if moved:
        await store.delete(names.openai_batches_built)  # the listings are rebuilt with them
    return moved


async def _hashes(store: Store, prefix: str, field: str) -> list[tuple[str, str, dict[str, str]]]:
    """(key, the id after ``prefix``, the hash) of every hash under ``prefix`` that has ``field``."""
    found = []
    for key in await store.keys_prefix(prefix):
        meta = await store.hgetall(key)
        if field in meta and valid_id(key[len(prefix) :]):
            found.append((key, key[len(prefix) :], meta))
    return found


async def _files(store: Store, data: BatchDir, names: Names) -> int:
    moved = 0
    for key, file_id, meta in await _hashes(store, names.legacy_file_meta_prefix, "purpose"):
        if "batch_id" in meta:  # an output or error file: its record alone
            await data.put_file_meta(file_id, meta)
        else:
            content = await store.get(names.legacy_file_content(file_id))
            if content is None:
                continue
            await data.put_file(file_id, content, meta)
        await store.delete(key, names.legacy_file_content(file_id))
        moved += 1
    return moved


async def _queue_batches(store: Store, data: BatchDir, names: Names) -> int:
    """The queue's record of each batch, its cancellation and its jobs' results."""
    moved = 0
    for key, batch_id, meta in await _hashes(store, names.legacy_job_batch_prefix, "count"):
        count = int(meta["count"])
        await data.put_record(
            batch_id,
            "batch.json",
            {
                "count": count,
                "model": meta.get("model", ""),
                "created_at": float(meta.get("created_at", 0)),
                "reply_to": meta.get("reply_to", ""),
            },
        )
        if meta.get("cancelled") == "1":
            await data.cancel(batch_id)
        results = [names.legacy_job_result(job_id(batch_id, i)) for i in range(count)]
        for i, result_key in enumerate(results):
            raw = await store.get(result_key)
            if raw is not None:
                await data.put_result(batch_id, job_id(batch_id, i), raw)
        await store.delete(key, *results)
        moved += 1
    return moved


async def _api_batches(store: Store, data: BatchDir, names: Names) -> int:
    """The Batch API's record of each batch; the store keeps its index entry (the owner)."""
    moved = 0
    for key, batch_id, meta in await _hashes(store, names.openai_batch(""), "valid"):  # not index entries
        record = _api_record(batch_id, meta)
        if "output_file_id" not in meta:  # made before output files had random ids: the old names
            for kind, file_id in (("output", record["output_file_id"]), ("errors", record["error_file_id"])):
                await data.put_file_meta(
                    file_id,
                    {
                        "owner": record["owner"],
                        "batch_id": batch_id,
                        "kind": kind,
                        "purpose": "batch_output",
                        "filename": f"{batch_id}_{kind}.jsonl",
                        "created_at": meta["created_at"],
                    },
                )
        await data.put_record(batch_id, "openai.json", record)
        await store.delete(key)
        await store.hset(key, {"owner": record["owner"]}, ttl_s=RESULT_TTL_S)
        moved += 1
    return moved


def _api_record(batch_id: str, meta: dict[str, str]) -> dict[str, Any]:
    return {
        "input_file_id": meta["input_file_id"],
        "endpoint": meta["endpoint"],
        "owner": meta.get("owner", ANONYMOUS),
        "completion_window": meta.get("completion_window", "24h"),
        "created_at": meta["created_at"],
        "created_ns": int(meta["created_at"]) * 10**9,
        "metadata": json.loads(meta.get("metadata", "{}")),
        "total": int(meta["total"]),
        "output_file_id": meta.get("output_file_id", f"file-{batch_id}-output"),
        "error_file_id": meta.get("error_file_id", f"file-{batch_id}-errors"),
        "valid": json.loads(meta["valid"]),
        "invalid": json.loads(meta["invalid"]),
    }
