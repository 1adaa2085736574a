"""Arrival processes: when each request of a run is sent.

Pure functions of their arguments and a ``numpy.random.Generator``: each returns the send offsets,
in seconds from the start of the run, as a non-decreasing float array. Closed-loop runs have no
arrival times (a new request leaves when one returns), so they are not here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ArrivalKind = Literal["poisson", "gamma", "constant", "closed", "trace"]
ARRIVAL_KINDS: tuple[ArrivalKind, ...] = ("poisson", "gamma", "constant", "closed", "trace")


def _check_rate(rate_per_s: float, count: int) -> None:
    if not rate_per_s > 0 or not np.isfinite(rate_per_s):
        raise ValueError(f"rate must be a positive finite number of requests/s, got {rate_per_s}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")


def poisson_arrivals(rate_per_s: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson process: exponential gaps with mean ``1 / rate_per_s``; the first request at 0."""
    return gamma_arrivals(rate_per_s, 1.0, count, rng)


def gamma_arrivals(rate_per_s: float, burstiness: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """Gamma renewal process with shape ``burstiness`` and the same mean rate.

    Gaps have mean ``1 / rate`` and squared coefficient of variation ``1 / burstiness``:
    burstiness 1 is Poisson, below 1 is burstier, above 1 is more regular.
    """
    _check_rate(rate_per_s, count)
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if count == 0:
        return np.zeros(0)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate_per_s * burstiness), size=count - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


def constant_arrivals(rate_per_s: float, count: int) -> np.ndarray:
    """Evenly spaced requests, ``1 / rate_per_s`` apart."""
    _check_rate(rate_per_s, count)
    return np.arange(count, dtype=float) / rate_per_s


def trace_arrivals(timestamps_s: np.ndarray, time_scale: float) -> np.ndarray:
    """Replay recorded timestamps, shifted to start at 0 and compressed by ``time_scale``.

    ``time_scale`` 10 replays ten times faster than recorded (gaps divided by 10).
    """
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    ts = np.asarray(timestamps_s, dtype=float)
    if ts.size == 0:
        return ts
    if np.any(np.diff(ts) < 0):
        raise ValueError("trace timestamps must be non-decreasing")
    return (ts - ts[0]) / time_scale
