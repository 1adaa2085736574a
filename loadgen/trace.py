"""Reading a request trace: one row per request with a timestamp and its token counts.

The format is the Azure LLM inference trace's: ``TIMESTAMP,ContextTokens,GeneratedTokens`` with
timestamps like ``2023-11-16 18:15:46.6805900`` (seven fractional digits). A plain number of
seconds is accepted as well.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from loadgen.lengths import Lengths


@dataclass(frozen=True)
class Trace:
    timestamps_s: np.ndarray  # seconds, relative to the first row
    lengths: Lengths

    def __len__(self) -> int:
        return int(self.timestamps_s.size)

    def head(self, count: int) -> Trace:
        return Trace(self.timestamps_s[:count], self.lengths.head(count))


def _parse_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    date, _, frac = text.partition(".")
    base = datetime.strptime(date, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_trace(path: Path, limit: int | None = None) -> Trace:
    times: list[float] = []
    rows: list[tuple[int, int]] = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if limit is not None and len(rows) >= limit:
                break
            times.append(_parse_time(row["TIMESTAMP"]))
            # a zero-length row cannot be sent; count it as one token
            rows.append((max(1, int(row["ContextTokens"])), max(1, int(row["GeneratedTokens"]))))
    if not rows:
        raise ValueError(f"{path}: no requests in the trace")
    ts = np.asarray(times)
    arr = np.asarray(rows, dtype=np.int64)
    order = np.argsort(ts, kind="stable")
    ts, arr = ts[order], arr[order]
    return Trace(ts - ts[0], Lengths(arr[:, 0], arr[:, 1]))
