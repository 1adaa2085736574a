"""Thin file loaders at the edge of the optimizer (the only module here that reads files)."""

from __future__ import annotations

import json
from pathlib import Path

from optimizer.cluster import Cluster, ClusterError, parse_cluster
from optimizer.lengths import TraceRequest, Workload, parse_length_csv, workload_from_trace
from optimizer.profile import ProfileError, ProfileSet, parse_profile


def load_profile(*paths: str | Path) -> ProfileSet:
    """Parse profile JSONL files; errors name the file."""
    texts = []
    for path in paths:
        texts.append(_read(path))
    try:
        return parse_profile(*texts)
    except ProfileError as exc:
        names = ", ".join(str(p) for p in paths)
        raise ProfileError(f"{names}: {exc}") from None


def load_workload(path: str | Path, max_input: int = 0, max_output: int = 0) -> Workload:
    """An empirical workload from a ``timestamp,input,output`` or ``input,output`` CSV."""
    try:
        rows = parse_length_csv(_read(path))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return workload_from_trace(Path(path).name, rows, max_input, max_output)


def load_trace(path: str | Path) -> tuple[TraceRequest, ...]:
    """A trace's requests with their arrival times (``timestamp,input,output`` CSV)."""
    try:
        return parse_length_csv(_read(path))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_cluster(path: str | Path) -> Cluster:
    """A cluster description (JSON, as ``exegpt profile --cluster-out`` writes it); errors name the file."""
    try:
        doc = json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise ClusterError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        return parse_cluster(doc)
    except ValueError as exc:
        raise ClusterError(f"{path}: {exc}") from None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file") from None
