"""Batch data on a directory: files, batch records and job results, where losing the store loses none.

Everything a batch is (its input file, its records, every job's result) is written here before it
counts; the store (Redis) keeps only an index over it (the Batch API's listings), which can be
rebuilt from here. Every process that serves or runs batches (gateways, ``exegpt batch worker``)
must see the same directory: one host, or a volume they share (NFS, a ReadWriteMany volume).

Layout under ``{root}/{namespace}/`` (ids are checked against ``ID``: a name from a request can
never leave the directory)::

    files/{file_id}                       an uploaded file's bytes
    files/{file_id}.json                  its record (owner, filename, purpose, ...); written last
    batches/{batch_id}/batch.json         the queue's record: count, model, created_at, reply_to
    batches/{batch_id}/openai.json        the Batch API's record (owner, endpoint, line map, ...)
    batches/{batch_id}/cancelled          present once the batch was cancelled
    batches/{batch_id}/results/{job_id}   the job's first stored result (encoded JobResult)
    batches/{batch_id}/replies/{job_id}   present once its reply was published

Each write goes to a temporary file that is flushed to disk, then takes its name in one step:
``os.replace`` for records, ``os.link`` (fails if the name exists) for results, so the first
result stored wins across processes and hosts, as set-if-absent did in the store. Calls run on a
thread: never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
NO_BATCH = "_unbatched"  # folder of results of jobs that name no batch
RECORDS = ("batch.json", "openai.json")


def valid_id(value: str) -> bool:
    return bool(ID.match(value)) and ".." not in value


class BatchDir:
    """The batch data of one namespace under ``root``."""

    def __init__(self, root: str | os.PathLike[str], namespace: str) -> None:
        if not valid_id(namespace):
            raise ValueError(f"namespace {namespace!r} cannot name a folder")
        self.root = Path(root) / namespace

    # --- files ------------------------------------------------------------------------------------
    async def put_file(self, file_id: str, content: bytes, meta: dict[str, str]) -> None:
        folder = self.root / "files"
        await asyncio.to_thread(_write_pair, folder / _checked(file_id), content, folder / f"{file_id}.json", meta)

    async def file_meta(self, file_id: str) -> dict[str, str] | None:
        if not valid_id(file_id):
            return None
        return await asyncio.to_thread(_read_json, self.root / "files" / f"{file_id}.json")

    async def put_file_meta(self, file_id: str, meta: dict[str, str]) -> None:
        await asyncio.to_thread(_write_json, self.root / "files" / f"{_checked(file_id)}.json", meta)

    async def file_content(self, file_id: str) -> bytes | None:
        if not valid_id(file_id):
            return None
        return await asyncio.to_thread(_read_bytes, self.root / "files" / file_id)

    # --- batch records ----------------------------------------------------------------------------
    def _batch(self, batch_id: str | None) -> Path:
        return self.root / "batches" / (NO_BATCH if batch_id is None else _checked(batch_id))

    async def put_record(self, batch_id: str, name: str, record: dict[str, Any]) -> None:
        """Write ``name`` (one of ``RECORDS``) of the batch, replacing what was there."""
        if name not in RECORDS:
            raise ValueError(f"no batch record {name!r}")
        await asyncio.to_thread(_write_json, self._batch(batch_id) / name, record)

    async def record(self, batch_id: str, name: str) -> dict[str, Any] | None:
        if not valid_id(batch_id) or name not in RECORDS:
            return None
        return await asyncio.to_thread(_read_json, self._batch(batch_id) / name)

    async def known(self, batch_id: str) -> bool:
        """Whether anything of the batch is here (a record, a result, its cancellation)."""
        return valid_id(batch_id) and await asyncio.to_thread(self._batch(batch_id).is_dir)

    async def cancel(self, batch_id: str) -> None:
        await asyncio.to_thread(_touch, self._batch(batch_id) / "cancelled")

    async def cancelled(self, batch_id: str | None) -> bool:
        if batch_id is None:
            return False
        return await asyncio.to_thread((self._batch(batch_id) / "cancelled").exists)

    async def batch_ids(self) -> list[str]:
        """Every batch with a folder here."""
        return await asyncio.to_thread(_subfolders, self.root / "batches")

    # --- results ----------------------------------------------------------------------------------
    async def put_result(self, batch_id: str | None, job_id: str, data: bytes) -> bool:
        """Store the job's result unless one is stored: True if this call stored it."""
        path = self._batch(batch_id) / "results" / _checked(job_id)
        return await asyncio.to_thread(_write_once, path, data)

    async def result(self, batch_id: str | None, job_id: str) -> bytes | None:
        return await asyncio.to_thread(_read_bytes, self._batch(batch_id) / "results" / _checked(job_id))

    async def results(self, batch_id: str) -> dict[str, bytes]:
        """Every stored result of the batch, by job id."""
        return await asyncio.to_thread(_read_all, self._batch(batch_id) / "results")

    async def mark_replied(self, batch_id: str | None, job_id: str) -> None:
        await asyncio.to_thread(_touch, self._batch(batch_id) / "replies" / _checked(job_id))

    async def replied(self, batch_id: str | None, job_id: str) -> bool:
        return await asyncio.to_thread((self._batch(batch_id) / "replies" / _checked(job_id)).exists)

    # --- retention --------------------------------------------------------------------------------
    async def expire(self, older_than_s: float) -> int:
        """Delete batches and files not written for ``older_than_s``; the number of them."""
        return await asyncio.to_thread(_expire, self.root, time.time() - older_than_s)


def _checked(value: str) -> str:
    if not valid_id(value):
        raise ValueError(f"{value[:80]!r} cannot name a file")
    return value


def _write_bytes(path: Path, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``path``, flushed to disk; its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = _write_bytes(path, json.dumps(record).encode())
    os.replace(tmp, path)
    _sync_folder(path.parent)


def _write_pair(path: Path, content: bytes, meta_path: Path, meta: dict[str, str]) -> None:
    """The content, then its record: a file exists once its record does."""
    os.replace(_write_bytes(path, content), path)
    _write_json(meta_path, meta)


def _write_once(path: Path, data: bytes) -> bool:
    tmp = _write_bytes(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    _sync_folder(path.parent)
    return True


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    _sync_folder(path.parent)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    raw = _read_bytes(path)
    return None if raw is None else json.loads(raw)


def _subfolders(folder: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(folder) if e.is_dir() and valid_id(e.name)]
    except FileNotFoundError:
        return []


def _read_all(folder: Path) -> dict[str, bytes]:
    out = {}
    try:
        entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    except FileNotFoundError:
        return {}
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            out[entry.name] = Path(entry.path).read_bytes()
    return out


def _expire(root: Path, before: float) -> int:
    gone = 0
    for batch in _subfolders(root / "batches"):
        folder = root / "batches" / batch
        if _newest_mtime(folder) < before:
            shutil.rmtree(folder, ignore_errors=True)
            gone += 1
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root / "files"):
            if entry.name.endswith(".json") and entry.stat().st_mtime < before:
                for path in (Path(entry.path), root / "files" / entry.name[: -len(".json")]):
                    path.unlink(missing_ok=True)
                gone += 1
    return gone


def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
    return newest
