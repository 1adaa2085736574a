"""Service-level objectives as users state them, and whether requests meet them.

An ``Slo`` holds up to three bounds, each optional (``math.inf``: not in force):

- ``ttft_s`` at ``ttft_percentile``: time to first token, from arrival;
- ``tpot_s`` at ``tpot_percentile``: time per output token after the first, (finish - first
  token) / (output tokens - 1); a one-token answer has none and meets it;
- ``e2e_s``: the paper's bound, end to end from arrival, which the search applies to a request of
  the 99th-percentile input and output length (``optimizer.analytic``).

A request *meets* the SLO when every bound in force holds for it; the *attainment* of a run is
the share of its requests that do. The SLO as a whole *holds* for a run when, for each bound in
force, the share of requests within it reaches that bound's percentile, and at least ``target``
of them meet every bound. The same functions read simulated records and measured ones (any
object with ``arrival_s``, ``first_token_s``, ``finish_s`` and ``output_len``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Timed(Protocol):
    @property
    def arrival_s(self) -> float: ...

    @property
    def first_token_s(self) -> float: ...

    @property
    def finish_s(self) -> float: ...

    @property
    def output_len(self) -> int: ...


@dataclass(frozen=True)
class Slo:
    """Bounds in seconds (inf: not in force), percentiles as fractions (0.99: p99)."""

    e2e_s: float = math.inf
    ttft_s: float = math.inf
    ttft_percentile: float = 0.99
    tpot_s: float = math.inf
    tpot_percentile: float = 0.99

    def __post_init__(self) -> None:
        for name in ("e2e_s", "ttft_s", "tpot_s"):
            value = getattr(self, name)
            if math.isnan(value) or value <= 0:
                raise ValueError(f"{name} must be > 0 (inf: none), got {value!r}")
        for name in ("ttft_percentile", "tpot_percentile"):
            value = getattr(self, name)
            if not 0.5 <= value < 1:
                raise ValueError(f"{name} must be in [0.5, 1), got {value!r}")

    @property
    def bounded(self) -> bool:
        return any(math.isfinite(b) for b in (self.e2e_s, self.ttft_s, self.tpot_s))

    @property
    def target(self) -> float:
        """The share of requests that must meet every bound in force: the highest percentile of
        the TTFT and TPOT bounds in force, 0.99 for the end-to-end bound (the paper's "99 % of
        requests finish within the bound")."""
        shares = [0.99] if math.isfinite(self.e2e_s) or not self.bounded else []
        if math.isfinite(self.ttft_s):
            shares.append(self.ttft_percentile)
        if math.isfinite(self.tpot_s):
            shares.append(self.tpot_percentile)
        return max(shares)

    def describe(self) -> str:
        parts = []
        if math.isfinite(self.ttft_s):
            parts.append(f"TTFT p{_pct(self.ttft_percentile)} <= {self.ttft_s:g} s")
        if math.isfinite(self.tpot_s):
            parts.append(f"TPOT p{_pct(self.tpot_percentile)} <= {self.tpot_s * 1e3:g} ms")
        if math.isfinite(self.e2e_s):
            parts.append(f"end to end <= {self.e2e_s:g} s")
        return ", ".join(parts) or "none"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}"


@dataclass(frozen=True)
class SloFigures:
    """What a run did against an SLO."""

    attainment: float  # share of requests meeting every bound in force
    ttft_s: float  # at the SLO's TTFT percentile
    tpot_s: float  # at the SLO's TPOT percentile
    e2e_p99_s: float
    holds: bool
    requests: int
    # how close the run is to its bounds: the largest (figure / bound) over the bounds in force,
    # the end-to-end one at p99 (below 1: slack; 0 when none is in force); lower is more margin
    pressure: float = 0.0


def ttft_of(r: Timed) -> float:
    return r.first_token_s - r.arrival_s


def tpot_of(r: Timed) -> float:
    return (r.finish_s - r.first_token_s) / (r.output_len - 1) if r.output_len > 1 else 0.0


def meets(r: Timed, slo: Slo) -> bool:
    return ttft_of(r) <= slo.ttft_s and tpot_of(r) <= slo.tpot_s and r.finish_s - r.arrival_s <= slo.e2e_s


def figures(records: Sequence[Timed] | Iterable[Timed], slo: Slo) -> SloFigures:
    """Attainment and the SLO's percentiles over ``records``; NaN figures when there are none."""
    rows = list(records)
    if not rows:
        return SloFigures(math.nan, math.nan, math.nan, math.nan, False, 0, math.nan)
    ttft = np.array([ttft_of(r) for r in rows])
    tpot = np.array([tpot_of(r) for r in rows])
    e2e = np.array([r.finish_s - r.arrival_s for r in rows])
    good = (ttft <= slo.ttft_s) & (tpot <= slo.tpot_s) & (e2e <= slo.e2e_s)
    attainment = float(good.mean())
    t_ttft = float(np.quantile(ttft, slo.ttft_percentile))
    t_tpot = float(np.quantile(tpot, slo.tpot_percentile))
    holds = (
        attainment >= slo.target - 1e-12
        and float(np.mean(ttft <= slo.ttft_s)) >= slo.ttft_percentile - 1e-12
        and float(np.mean(tpot <= slo.tpot_s)) >= slo.tpot_percentile - 1e-12
    )
    ratios = [
        f / b
        for f, b in ((t_ttft, slo.ttft_s), (t_tpot, slo.tpot_s), (float(np.quantile(e2e, 0.99)), slo.e2e_s))
        if math.isfinite(b)
    ]
    return SloFigures(
        attainment, t_ttft, t_tpot, float(np.quantile(e2e, 0.99)), holds, len(rows), max(ratios, default=0.0)
    )
