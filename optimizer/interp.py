"""Monotone interpolation of measured step times, and the noise rule every profile goes through.

**Noise rule** (``smooth_points``; the profiler applies it before writing and ``parse_profile``
when loading, so both see the same tables): more work never takes less time, so measured values
are made non-decreasing along every axis with a running maximum (a point below an earlier one is
raised to it: conservative, since no step is assumed cheaper than a measured step with less
work; a slow outlier is carried forward until the measurements pass it, which is why large drops
are reported). In two dimensions each row (along the inner variable) and each
column (along the outer one, where rows share a value) is raised in turn until nothing moves. A
point that lies below an earlier point of its row or column by more than ``tolerance``
(relative) and ``floor`` (absolute) is reported as a ``Drop``, for a warning; smaller dips are
timing noise and are smoothed silently.

**Interpolation**: piecewise-linear in the raw coordinates (layer times are close to affine in
tokens, batch and context, and linear interpolation is exact for affine data). Below the first
grid point the first value holds (a step never gets cheaper than the smallest one measured);
beyond the last point the last segment's slope continues the line (linear extrapolation,
slope >= 0). Both classes evaluate numpy arrays and Python scalars alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

NOISE_TOLERANCE = 0.10  # a drop of more than 10 % below an earlier point is reported
MAX_ROUNDS = 50  # row/column passes of the 2-D smoothing (it settles in a few)

Values = float | np.ndarray  # one figure, or many at once


def running_max(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``values`` made non-decreasing: each one raised to the largest before it."""
    return np.maximum.accumulate(np.asarray(values, dtype=float))


@dataclass(frozen=True)
class Drop:
    """A measured point below an earlier point on the same axis by more than the tolerance."""

    at: Any  # the lower point's key (x, or (row, col)): keys of one kind compare
    above: Any  # the earlier point it falls below
    value: float
    earlier: float

    @property
    def fraction(self) -> float:
        return 1.0 - self.value / self.earlier if self.earlier > 0 else 0.0


@dataclass(frozen=True)
class Smoothed:
    points: dict[Any, float]  # key -> smoothed value, non-decreasing along every axis
    drops: tuple[Drop, ...]  # raw points that broke monotonicity beyond the tolerance (one per point)


def _drops(keys: list[Any], values: list[float], tolerance: float, floor: float) -> list[Drop]:
    """Points (in axis order) more than the tolerance below the highest point before them."""
    out, top = [], 0
    for i in range(1, len(values)):
        gap = values[top] - values[i]
        if gap > floor and gap > tolerance * values[top]:
            out.append(Drop(keys[i], keys[top], values[i], values[top]))
        if values[i] > values[top]:
            top = i
    return out


def _lines(points: dict[tuple[float, float], float], by_row: bool) -> list[list[tuple[float, float]]]:
    """Keys of a 2-D table grouped into rows (same row, ordered by col) or columns."""
    groups: dict[float, list[tuple[float, float]]] = {}
    for key in points:
        groups.setdefault(key[0] if by_row else key[1], []).append(key)
    return [sorted(keys, key=lambda k: (k[1], k[0]) if by_row else (k[0], k[1])) for _, keys in sorted(groups.items())]


def _pass(values: dict[tuple[float, float], float], lines: list[list[tuple[float, float]]]) -> float:
    """Smooth each line in place; return the largest change."""
    moved = 0.0
    for keys in lines:
        fitted = running_max([values[k] for k in keys])
        for k, v in zip(keys, fitted):
            moved = max(moved, abs(v - values[k]))
            values[k] = float(v)
    return moved


def smooth_points(points: dict[Any, float], tolerance: float = NOISE_TOLERANCE, floor: float = 0.0) -> Smoothed:
    """The noise rule: ``points`` maps x (a curve) or (row, col) (a table) to a measured value."""
    if not points:
        return Smoothed({}, ())
    if not isinstance(next(iter(points)), tuple):
        keys = sorted(points)
        raw = [float(points[k]) for k in keys]
        smooth = dict(zip(keys, (float(v) for v in running_max(raw))))
        return Smoothed(smooth, tuple(_drops(keys, raw, tolerance, floor)))
    rows, cols = _lines(points, by_row=True), _lines(points, by_row=False)
    worst: dict[tuple[float, float], Drop] = {}  # one drop per point: the deepest, along its row or its column
    for line in rows + cols:
        for d in _drops(line, [float(points[k]) for k in line], tolerance, floor):
            if d.at not in worst or d.fraction > worst[d.at].fraction:
                worst[d.at] = d
    values = {k: float(v) for k, v in points.items()}
    for _ in range(MAX_ROUNDS):
        scale = max(max(abs(v) for v in values.values()), 1e-300)
        if max(_pass(values, rows), _pass(values, cols)) <= 1e-12 * scale:
            break
    return Smoothed(values, tuple(sorted(worst.values(), key=lambda d: d.at)))


COL_CACHE = 4096  # lengths a grid remembers its rows' values at (a search asks a few, many times)


def _interp_extrap(xs: np.ndarray, ys: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation at points ``x`` (n,) of columns ``ys`` (len(xs), n), one
    per point, or of one curve ``ys`` (len(xs),); the first value below ``xs[0]``, the last
    segment's slope (at least 0) beyond ``xs[-1]``."""
    if len(xs) == 1:
        return np.array(np.broadcast_to(ys[0], np.shape(x)), dtype=float)
    i = np.minimum(np.maximum(np.searchsorted(xs, x, side="right") - 1, 0), len(xs) - 2)
    x0, x1 = xs[i], xs[i + 1]
    y0, y1 = (ys[i], ys[i + 1]) if ys.ndim == 1 else (ys[i, np.arange(ys.shape[1])], ys[i + 1, np.arange(ys.shape[1])])
    slope = np.maximum((y1 - y0) / (x1 - x0), 0.0)
    out: np.ndarray = np.where(x <= xs[0], ys[0], y0 + slope * (x - x0))
    return out


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
    def from_points(points: dict[float, float]) -> MonotoneCurve:
        smooth = smooth_points(points).points
        xs = sorted(smooth)
        ys = np.maximum.accumulate(np.array([smooth[x] for x in xs], dtype=float))
        return MonotoneCurve(tuple(float(x) for x in xs), tuple(float(y) for y in ys))

    def __call__(self, x: Values) -> float | npt.NDArray[np.float64]:
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

    At a query, the rows whose measured cols reach ``col`` are evaluated there (interpolation
    only), made non-decreasing and interpolated (or extrapolated) along ``row`` like a curve.
    Rows that stop short of ``col`` are left out, since a profile skips the biggest cells: their
    time is then extrapolated along the batch (close to linear) rather than along the length
    (attention grows faster than linearly). Beyond every row's reach, the rows that reach
    furthest are extrapolated along ``col``.
    """

    rows: tuple[float, ...]
    curves: tuple[MonotoneCurve, ...]
    # look-up tables, built by __post_init__
    _rows: np.ndarray = field(init=False, repr=False, compare=False)
    _reach: np.ndarray = field(init=False, repr=False, compare=False)
    _levels: np.ndarray = field(init=False, repr=False, compare=False)
    _groups: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] = field(init=False, repr=False, compare=False)
    _col_cache: dict[float, tuple[np.ndarray, np.ndarray]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.rows) == 0 or len(self.rows) != len(self.curves):
            raise ValueError("a grid needs one curve per row, at least one row")
        if any(b <= a for a, b in zip(self.rows, self.rows[1:])):
            raise ValueError(f"grid rows must increase strictly, got {self.rows}")
        # Look-up tables built once (the search evaluates a grid some ten thousand times): the
        # rows and their reach, and the rows grouped by the cols they were measured at, each
        # group's values one array, so that a group is interpolated in one pass.
        reach = np.array([curve.xs[-1] for curve in self.curves])
        groups: dict[tuple[float, ...], list[int]] = {}
        for i, curve in enumerate(self.curves):
            groups.setdefault(curve.xs, []).append(i)
        object.__setattr__(self, "_col_cache", {})  # col -> the rows reaching it and their values there
        object.__setattr__(self, "_rows", np.asarray(self.rows, dtype=float))
        object.__setattr__(self, "_reach", reach)
        object.__setattr__(self, "_levels", np.unique(reach))
        object.__setattr__(
            self,
            "_groups",
            tuple(
                (np.array(idx), np.asarray(xs, dtype=float), np.array([self.curves[i].ys for i in idx], dtype=float))
                for xs, idx in groups.items()
            ),
        )

    def _per_row(self, ca: np.ndarray) -> np.ndarray:
        """Every row's curve at ``ca``: (rows, n), as ``MonotoneCurve.__call__`` gives it (the
        first value below the first col, linear beyond the last with the last segment's slope,
        which is >= 0 since a curve's values never fall)."""
        out = np.empty((len(self.curves), len(ca)))
        for idx, xs, ys in self._groups:
            if len(xs) == 1:
                out[idx] = ys
                continue
            i = np.minimum(np.maximum(np.searchsorted(xs, ca, side="right") - 1, 0), len(xs) - 2)
            t = np.maximum((ca - xs[i]) / (xs[i + 1] - xs[i]), 0.0)
            y0 = ys[:, i]
            out[idx] = y0 + (ys[:, i + 1] - y0) * t
        return out

    def _at_col(self, row: Values, col: float) -> float | npt.NDArray[np.float64]:
        """``self(row, col)`` at one ``col``: the rows that reach it, made non-decreasing, as one
        curve along ``row`` (the same values as the general path)."""
        cached = self._col_cache.get(col)
        if cached is None:
            levels = self._levels
            use = self._reach >= levels[np.searchsorted(levels, min(col, levels[-1]))]  # the rows reaching col
            cached = self._rows[use], np.maximum.accumulate(self._per_row(np.array([col]))[use, 0])
            if len(self._col_cache) >= COL_CACHE:
                self._col_cache.clear()
            self._col_cache[col] = cached
        rows, values = cached
        ra = np.asarray(row, dtype=float)
        out = _interp_extrap(rows, values, ra)
        return out if np.ndim(out) else float(out)

    @staticmethod
    def from_points(points: dict[tuple[float, float], float]) -> MonotoneGrid:
        by_row: dict[float, dict[float, float]] = {}
        for (row, col), value in smooth_points(points).points.items():
            by_row.setdefault(row, {})[col] = value
        rows = sorted(by_row)
        return MonotoneGrid(tuple(float(r) for r in rows), tuple(MonotoneCurve.from_points(by_row[r]) for r in rows))

    def __call__(self, row: Values, col: Values) -> float | npt.NDArray[np.float64]:
        if np.ndim(col) == 0:  # the common query: many batches at one length
            return self._at_col(row, float(col))
        ra, ca = np.broadcast_arrays(np.asarray(row, dtype=float), np.asarray(col, dtype=float))
        shape = ra.shape
        ra, ca = ra.reshape(-1), ca.reshape(-1)
        rows, reach, levels = self._rows, self._reach, self._levels
        if ca.size > 1 and ca.min() == ca.max():
            return self._at_col(ra.reshape(shape), float(ca[0]))
        per_row = self._per_row(ca)  # (rows, n)
        level = np.searchsorted(levels, np.minimum(ca, levels[-1]))  # rows reaching col: reach >= levels[level]
        out: npt.NDArray[np.float64] = np.empty(len(ca))
        for lv in range(len(levels)):
            at = level == lv
            if not at.any():
                continue
            use = reach >= levels[lv]
            values = np.maximum.accumulate(per_row[use][:, at], axis=0)
            out[at] = _interp_extrap(rows[use], values, ra[at])
        out = out.reshape(shape)
        return out if shape else float(out)
