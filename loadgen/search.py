"""Rate sweeps and the bisection to the highest rate that still meets the SLOs.

Both take ``measure(rate) -> Summary`` (one full run at that rate), so the search logic is tested
without a server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from loadgen.metrics import Summary

Measure = Callable[[float], Awaitable[Summary]]


@dataclass(frozen=True)
class RatePoint:
    rate_per_s: float
    summary: Summary

    @property
    def attainment(self) -> float:
        return self.summary.slo_attainment


@dataclass(frozen=True)
class BisectionResult:
    """``max_rate_per_s`` is the highest measured rate whose attainment reached the target, or
    ``None`` when even the lowest rate missed it. ``points`` are every run, in the order made."""

    target_attainment: float
    max_rate_per_s: float | None
    points: tuple[RatePoint, ...]


async def sweep(rates: Sequence[float], measure: Measure) -> list[RatePoint]:
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"sweep rates must be positive, got {list(rates)}")
    return [RatePoint(r, await measure(r)) for r in rates]


async def find_max_rate(
    measure: Measure,
    target_attainment: float,
    low_per_s: float,
    high_per_s: float,
    max_runs: int = 8,
    rel_tolerance: float = 0.05,
) -> BisectionResult:
    """Bisect between ``low`` and ``high``, assuming attainment falls as the rate rises.

    Measures ``high`` first (if it passes, it is the answer: the search never goes above it), then
    ``low`` (if it fails, nothing passes), then halves the bracket until it is narrower than
    ``rel_tolerance`` × its upper end or ``max_runs`` runs were made.
    """
    if not 0 < low_per_s < high_per_s:
        raise ValueError(f"need 0 < low < high, got {low_per_s}, {high_per_s}")
    if not 0 < target_attainment <= 1:
        raise ValueError(f"target attainment must be in (0, 1], got {target_attainment}")
    if max_runs < 2:
        raise ValueError("bisection needs at least 2 runs")
    points: list[RatePoint] = []

    async def passes(rate: float) -> bool:
        point = RatePoint(rate, await measure(rate))
        points.append(point)
        return point.attainment >= target_attainment

    if await passes(high_per_s):
        return BisectionResult(target_attainment, high_per_s, tuple(points))
    if not await passes(low_per_s):
        return BisectionResult(target_attainment, None, tuple(points))
    good, bad = low_per_s, high_per_s
    while len(points) < max_runs and (bad - good) > rel_tolerance * bad:
        mid = (good + bad) / 2
        if await passes(mid):
            good = mid
        else:
            bad = mid
    return BisectionResult(target_attainment, good, tuple(points))
