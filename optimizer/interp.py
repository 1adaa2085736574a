"""Monotone interpolation of measured step times.

Layer times are close to affine in tokens, batch and context, so we interpolate piecewise-linearly
in the raw coordinates (exact for affine data), after forcing the measured values to be
non-decreasing (cumulative maximum: more work never takes less time). Below the first grid point
the first value holds (a step never gets cheaper than the smallest one measured); beyond the last
point the last segment's slope continues the line (linear extrapolation, slope >= 0).

Both classes evaluate numpy arrays and Python scalars alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _monotone(values: np.ndarray, axis: int = 0) -> np.ndarray:
    return np.maximum.accumulate(values, axis=axis)


def _interp_extrap(xs: np.ndarray, ys: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation of columns ``ys`` (len(xs), n) at points ``x`` (n,)."""
    if len(xs) == 1:
        return ys[0]
    i = np.clip(np.searchsorted(xs, x, side="right") - 1, 0, len(xs) - 2)
    x0, x1 = xs[i], xs[i + 1]
    cols = np.arange(ys.shape[1])
    y0, y1 = ys[i, cols], ys[i + 1, cols]
    slope = np.maximum((y1 - y0) / (x1 - x0), 0.0)
    return np.where(x <= xs[0], ys[0], y0 + slope * (x - x0))


@dataclass(frozen=True)
class MonotoneCurve:
    """y(x) from measured points, non-decreasing, linear beyond the last point."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.xs) == 0 or len(self.xs) != len(self.ys):
            raise ValueError("a curve needs as many x as y values, at least one")
        if any(b <= a for a, b in zip(self.xs, self.xs[1:])):
            raise ValueError(f"curve x values must increase strictly, got {self.xs}")

    @staticmethod
    def from_points(points: dict[float, float]) -> "MonotoneCurve":
        xs = sorted(points)
        ys = _monotone(np.array([points[x] for x in xs], dtype=float))
        return MonotoneCurve(tuple(float(x) for x in xs), tuple(float(y) for y in ys))

    def __call__(self, x):
        xs, ys = self.xs, self.ys
        xa = np.asarray(x, dtype=float)
        out = np.interp(xa, xs, ys)
        if len(xs) > 1:
            slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
            out = np.where(xa > xs[-1], ys[-1] + slope * (xa - xs[-1]), out)
        return out if np.ndim(x) else float(out)


@dataclass(frozen=True)
class MonotoneGrid:
    """z(row, col) over a possibly ragged grid: one curve per measured row value.

    Each row's curve is evaluated at ``col``; the row values are then made non-decreasing and
    interpolated (and extrapolated) along ``row`` the same way as a curve.
    """

    rows: tuple[float, ...]
    curves: tuple[MonotoneCurve, ...]

    def __post_init__(self) -> None:
        if len(self.rows) == 0 or len(self.rows) != len(self.curves):
            raise ValueError("a grid needs one curve per row, at least one row")
        if any(b <= a for a, b in zip(self.rows, self.rows[1:])):
            raise ValueError(f"grid rows must increase strictly, got {self.rows}")

    @staticmethod
    def from_points(points: dict[tuple[float, float], float]) -> "MonotoneGrid":
        by_row: dict[float, dict[float, float]] = {}
        for (row, col), value in points.items():
            by_row.setdefault(row, {})[col] = value
        rows = sorted(by_row)
        return MonotoneGrid(tuple(float(r) for r in rows),
                            tuple(MonotoneCurve.from_points(by_row[r]) for r in rows))

    def __call__(self, row, col):
        ra, ca = np.broadcast_arrays(np.asarray(row, dtype=float), np.asarray(col, dtype=float))
        shape = ra.shape
        ra, ca = ra.reshape(-1), ca.reshape(-1)
        per_row = _monotone(np.stack([curve(ca) for curve in self.curves]), axis=0)
        out = _interp_extrap(np.asarray(self.rows, dtype=float), per_row, ra).reshape(shape)
        return out if shape else float(out)
