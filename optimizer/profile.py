"""XProfiler tables: per-layer step times by phase, batch, length and TP degree.

Two row formats (JSON lines, times in ``ms``; see ../shared/profiles/README.md):

- whole layers: ``{"model", "tp", "phase": prefill|encode|decode, "batch", "seq" | "ctx"
  [, "enc_seq"], "ms"}``
- split, as the ExeGPT profiler measures: ``{"model", "tp", "part": "rest", "tokens", "ms"}`` and
  ``{"part": "attn_prefill" | "attn_encode", "batch", "seq"}`` / ``{"part": "attn_decode",
  "batch", "ctx"}``.
- in either file, what an engine step costs besides its layers: ``{"model", "tp", "part": "step",
  "rows", "ms"}`` by the rows that get logits (the LM head, sampling and the engine's own work per
  step; our profiler measures it, the reference files have none and it then counts as zero).

A step's layer time from the split table is rest(all tokens in the step) + attention per shape
(prefill attention at the batch's effective length, decode attention at its mean context; for
T5 decode, cross-attention is costed as decode attention over the encoder length). Rows without a
model (device header, ``probe`` rows) are kept as metadata.

Every table goes through the noise rule (``optimizer.interp.smooth_points``) when it is loaded;
``smooth_rows`` applies the same rule to rows before the profiler writes them. A table too
sparse to interpolate (fewer than two token counts, batch sizes, or lengths in a batch's row) is
rejected with what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from optimizer.interp import NOISE_TOLERANCE, Drop, MonotoneCurve, MonotoneGrid, smooth_points

MS = 1e-3
NOISE_FLOOR_MS = 0.01  # dips smaller than 10 us are below what a timed Python call resolves
FAR_EXTRAPOLATION = 1.25  # a plan needing lengths beyond 1.25x the profiled ones is refused

Values = float | np.ndarray  # one step's figure, or many steps' at once
_Points = dict[Any, float]  # one table's points: x (a curve) or (row, col) (a grid) -> ms


@dataclass(frozen=True)
class StepShape:
    """The work one layer does in one step; fields may be numpy arrays (many steps at once).

    ``prefill_seq`` is the effective prompt length for attention (sqrt of the mean squared
    length, since causal attention grows with its square); ``decode_ctx`` the mean KV length.
    """

    prefill_seqs: Values = 0.0
    prefill_tokens: Values = 0.0
    prefill_seq: Values = 1.0
    decode_seqs: Values = 0.0
    decode_ctx: Values = 1.0
    enc_seq: Values = 0.0  # T5: encoder length seen by cross-attention

    def split(self, parts: Values) -> StepShape:
        """One of ``parts`` equal micro-batches of this step."""
        return StepShape(
            self.prefill_seqs / parts,
            self.prefill_tokens / parts,
            self.prefill_seq,
            self.decode_seqs / parts,
            self.decode_ctx,
            self.enc_seq,
        )

    @property
    def tokens(self) -> Values:
        return self.prefill_tokens + self.decode_seqs


@dataclass(frozen=True)
class Coverage:
    """The largest shapes a table measured: beyond them, times are extrapolated."""

    batch: float  # the smaller of the largest prefill and decode batch
    prompt_len: float  # prefill (encode) sequence length
    context: float  # decode KV length
    tokens: float  # tokens in one step (split: the rest-of-layer curve; whole: prefill batch x seq)
    decode_batch: float = 0.0  # the largest decode batch


class LayerTimes(Protocol):
    def step_s(self, shape: StepShape) -> npt.NDArray[np.float64]:
        """Seconds one layer (one TP shard, collectives excluded) takes for ``shape``."""
        ...

    @property
    def coverage(self) -> Coverage: ...


def _where_positive(count: npt.ArrayLike, value: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return np.where(np.asarray(count) > 0, value, 0.0)


def _reach(grid: MonotoneGrid) -> float:
    return max(curve.xs[-1] for curve in grid.curves)


@dataclass(frozen=True)
class SplitLayerTimes:
    rest: MonotoneCurve
    attn_prefill: MonotoneGrid
    attn_decode: MonotoneGrid

    def step_s(self, shape: StepShape) -> npt.NDArray[np.float64]:
        s = shape
        rest = _where_positive(s.tokens, self.rest(np.maximum(s.tokens, 1.0)))
        pre = _where_positive(s.prefill_seqs, self.attn_prefill(np.maximum(s.prefill_seqs, 1e-9), s.prefill_seq))
        dec = self.attn_decode(np.maximum(s.decode_seqs, 1e-9), s.decode_ctx)
        cross = _where_positive(
            s.enc_seq, self.attn_decode(np.maximum(s.decode_seqs, 1e-9), np.maximum(s.enc_seq, 1.0))
        )
        return (rest + pre + _where_positive(s.decode_seqs, dec + cross)) * MS

    @property
    def coverage(self) -> Coverage:
        return Coverage(
            min(self.attn_prefill.rows[-1], self.attn_decode.rows[-1]),
            _reach(self.attn_prefill),
            _reach(self.attn_decode),
            self.rest.xs[-1],
            self.attn_decode.rows[-1],
        )


@dataclass(frozen=True)
class WholeLayerTimes:
    """Whole-layer tables; T5 decode tables are kept per encoder length and interpolated."""

    prefill: MonotoneGrid
    decode_by_enc_seq: tuple[tuple[float, MonotoneGrid], ...]

    def _decode(self, seqs: Values, ctx: Values, enc_seq: Values) -> float | npt.NDArray[np.float64]:
        grids = self.decode_by_enc_seq
        if len(grids) == 1:
            return grids[0][1](seqs, ctx)
        shape = np.broadcast(seqs, ctx, enc_seq).shape
        seqs, ctx, enc = (a.reshape(-1).astype(float) for a in np.broadcast_arrays(seqs, ctx, enc_seq))
        lens = np.array([e for e, _ in grids])
        vals = np.stack([g(seqs, ctx) for _, g in grids])
        idx = np.clip(np.searchsorted(lens, enc) - 1, 0, len(lens) - 2)
        frac = np.clip((enc - lens[idx]) / (lens[idx + 1] - lens[idx]), 0.0, None)
        cols = np.arange(len(enc))
        lo, hi = vals[idx, cols], vals[idx + 1, cols]
        out: npt.NDArray[np.float64] = (lo + frac * np.maximum(hi - lo, 0.0)).reshape(shape)
        return out

    def step_s(self, shape: StepShape) -> npt.NDArray[np.float64]:
        s = shape
        pseqs = np.maximum(s.prefill_seqs, 1e-9)
        pre = self.prefill(pseqs, np.maximum(s.prefill_tokens / pseqs, 1.0))
        dec = self._decode(np.maximum(s.decode_seqs, 1e-9), s.decode_ctx, s.enc_seq)
        return (_where_positive(s.prefill_seqs, pre) + _where_positive(s.decode_seqs, dec)) * MS

    @property
    def coverage(self) -> Coverage:
        p = self.prefill
        tokens = max(r * c.xs[-1] for r, c in zip(p.rows, p.curves))
        decode_rows = min(g.rows[-1] for _, g in self.decode_by_enc_seq)
        context = min(_reach(g) for _, g in self.decode_by_enc_seq)
        return Coverage(min(p.rows[-1], decode_rows), _reach(p), context, tokens, decode_rows)


@dataclass(frozen=True)
class ProfileSet:
    """Every model and TP degree found in one or more profile files."""

    split: dict[tuple[str, int], SplitLayerTimes] = field(default_factory=dict)
    whole: dict[tuple[str, int], WholeLayerTimes] = field(default_factory=dict)
    metadata: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()  # rows the noise rule had to raise by more than its tolerance
    step: dict[tuple[str, int], MonotoneCurve] = field(default_factory=dict)  # per-step work, by rows

    def step_s(self, model: str, tp: int = 1) -> Callable[[Values], npt.NDArray[np.float64]] | None:
        """What one engine step costs besides its layers (the LM head over the rows that get
        logits, sampling, the engine's own work per step), as a function of those rows, in
        seconds; None when the profile did not measure it (the reference files do not)."""
        curve = self.step.get((model, tp))
        if curve is None:
            return None
        return lambda rows: _where_positive(rows, curve(np.maximum(rows, 1.0))) * MS

    def models(self) -> list[str]:
        return sorted({m for m, _ in self.split} | {m for m, _ in self.whole})

    def tp_degrees(self, model: str) -> list[int]:
        return sorted({t for m, t in self.split if m == model} | {t for m, t in self.whole if m == model})

    def layer_times(self, model: str, tp: int) -> LayerTimes:
        """Split tables when measured (the paper's method), whole-layer tables otherwise."""
        key = (model, tp)
        if key in self.split:
            return self.split[key]
        if key in self.whole:
            return self.whole[key]
        raise ValueError(
            f"profile has no rows for model {model!r} at tp={tp}; models: {', '.join(self.models()) or 'none'}"
        )

    def coverage(self, model: str, tp: int = 1) -> Coverage:
        return self.layer_times(model, tp).coverage

    def probe(self, name: str) -> dict[str, Any] | None:
        return next((row for row in self.metadata if row.get("probe") == name), None)


@dataclass(frozen=True)
class RangeGap:
    """A length a plan needs beyond the largest one profiled."""

    axis: str  # "prompt length" or "context"
    needed: float
    profiled: float

    @property
    def far(self) -> bool:
        """Too far to extrapolate: the plan should be refused."""
        return self.needed > FAR_EXTRAPOLATION * self.profiled


def range_gaps(coverage: Coverage, prompt_len: float, context: float) -> tuple[RangeGap, ...]:
    """The lengths (a workload's 99th-percentile prompt and prompt + output) that the profile's
    tables do not reach; each is extrapolated, and a ``far`` one should not be."""
    gaps = (RangeGap("prompt length", prompt_len, coverage.prompt_len), RangeGap("context", context, coverage.context))
    return tuple(g for g in gaps if g.needed > g.profiled)


def batch_gaps(coverage: Coverage, decode_batch: float, tokens: float) -> tuple[RangeGap, ...]:
    """The decode batch (sequences in one decode step) and the step tokens (a prefill's) a plan
    runs that lie more than ``FAR_EXTRAPOLATION`` x beyond the largest the profile measured: times
    there are extrapolated linearly (close to affine in both), so such a plan is kept, with a
    warning. (Prefill attention is per sequence, so the prefill batch is covered by the tokens.)"""
    gaps = (
        RangeGap("decode batch", decode_batch, coverage.decode_batch),
        RangeGap("step tokens", tokens, coverage.tokens),
    )
    return tuple(g for g in gaps if g.far)


class ProfileError(ValueError):
    """A profile row that cannot be used; the message names the line."""


# --- rows -> cells ------------------------------------------------------------------------------

_PART_KEYS = {
    "rest": ("tokens",),
    "attn_prefill": ("batch", "seq"),
    "attn_encode": ("batch", "seq"),
    "attn_decode": ("batch", "ctx"),
    "step": ("rows",),
}
_PHASE_KEYS = {"prefill": ("batch", "seq"), "encode": ("batch", "seq"), "decode": ("batch", "ctx")}
_TABLE_OF = {"attn_encode": "attn_prefill", "encode": "prefill"}  # one table for both names


@dataclass(frozen=True)
class _Table:
    """One interpolation table: a split part, or a whole-layer phase (decode: per encoder length)."""

    model: str
    tp: int
    name: str  # rest | attn_prefill | attn_decode | prefill | decode
    enc_seq: float = 0.0
    axes: tuple[str, ...] = ()

    def describe(self, coords: tuple[float, ...] = ()) -> str:
        enc = f" enc_seq={self.enc_seq:g}" if self.enc_seq else ""
        where = " ".join(f"{a}={c:g}" for a, c in zip(self.axes, coords))
        return f"{self.model} tp={self.tp} {self.name}{enc}" + (f" {where}" if where else "")


@dataclass(frozen=True)
class _Cell:
    """One measured row."""

    index: int  # position in the row list
    table: _Table
    coords: tuple[float, ...]
    ms: float

    @property
    def key(self) -> float | tuple[float, ...]:
        return self.coords if len(self.coords) > 1 else self.coords[0]


def _parse_lines(text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ProfileError(f"line {number}: expected a JSON object")
        rows.append((number, row))
    return rows


def _number(row: dict[str, Any], key: str, number: int) -> float:
    value = row.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ProfileError(f"line {number}: field {key!r} must be a non-negative number, got {value!r}")
    return float(value)


def _row_key(row: dict[str, Any], number: int) -> tuple[str, int]:
    tp = row.get("tp")
    if not isinstance(tp, int) or tp < 1:
        raise ProfileError(f"line {number}: field 'tp' must be an integer >= 1, got {tp!r}")
    return str(row["model"]), tp


def _cell(index: int, number: int, row: dict[str, Any]) -> _Cell:
    model, tp = _row_key(row, number)
    ms = _number(row, "ms", number)
    if "part" in row:
        kind, axes = row["part"], _PART_KEYS.get(row["part"])
        if axes is None:
            raise ProfileError(f"line {number}: unknown part {kind!r}")
        enc = 0.0
    elif row.get("phase") in _PHASE_KEYS:
        kind, axes = row["phase"], _PHASE_KEYS[row["phase"]]
        enc = _number(row, "enc_seq", number) if kind == "decode" and "enc_seq" in row else 0.0
    else:
        raise ProfileError(
            f"line {number}: a model row needs 'part' or a phase prefill|encode|decode, got {row.get('phase')!r}"
        )
    table = _Table(model, tp, _TABLE_OF.get(kind, kind), enc, axes)
    return _Cell(index, table, tuple(_number(row, k, number) for k in axes), ms)


def _cells(rows: Sequence[tuple[int, dict[str, Any]]]) -> tuple[list[_Cell], tuple[dict[str, Any], ...]]:
    """Measured rows as cells (validated), and the rows without a model (metadata)."""
    cells, meta = [], []
    for index, (number, row) in enumerate(rows):
        if "model" in row:
            cells.append(_cell(index, number, row))
        else:
            meta.append(row)
    return cells, tuple(meta)


# --- the noise rule over cells ------------------------------------------------------------------


def _warning(table: _Table, drop: Drop) -> str:
    at = drop.at if isinstance(drop.at, tuple) else (drop.at,)
    above = drop.above if isinstance(drop.above, tuple) else (drop.above,)
    return (
        f"{table.describe(at)}: {drop.value:.4g} ms is {drop.fraction:.0%} below {drop.earlier:.4g} ms "
        f"at {' '.join(f'{a}={c:g}' for a, c in zip(table.axes, above))}; raised to it"
    )


def _tables(cells: Iterable[_Cell]) -> dict[_Table, _Points]:
    """Each table's points (coords -> ms); a repeated cell keeps its last value."""
    tables: dict[_Table, _Points] = {}
    for c in cells:
        tables.setdefault(c.table, {})[c.key] = c.ms
    return tables


def smooth_cells(
    cells: Sequence[_Cell], tolerance: float = NOISE_TOLERANCE, floor_ms: float = NOISE_FLOOR_MS
) -> tuple[list[_Cell], tuple[str, ...]]:
    """The noise rule over every table of ``cells``: (cells with smoothed ms, warnings)."""
    smoothed: dict[_Table, _Points] = {}
    warnings: list[str] = []
    for table, points in _tables(cells).items():
        result = smooth_points(points, tolerance, floor_ms)
        smoothed[table] = result.points
        warnings += [_warning(table, d) for d in result.drops]
    return [replace(c, ms=smoothed[c.table][c.key]) for c in cells], tuple(warnings)


@dataclass(frozen=True)
class SmoothedRows:
    rows: list[dict[str, Any]]  # the input rows, ``ms`` smoothed (``ms_raw`` keeps a changed measurement)
    warnings: tuple[str, ...]


def smooth_rows(rows: Sequence[dict[str, Any]], tolerance: float = NOISE_TOLERANCE) -> SmoothedRows:
    """The noise rule ``parse_profile`` applies, on rows before they are written (the profiler)."""
    cells, _ = _cells(list(enumerate(rows, start=1)))
    fixed, warnings = smooth_cells(cells, tolerance)
    out = [dict(r) for r in rows]
    for cell in fixed:
        row = out[cell.index]
        if cell.ms != row["ms"]:
            row["ms_raw"], row["ms"] = row["ms"], cell.ms
    return SmoothedRows(out, warnings)


# --- cells -> tables ----------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _check_dense(table: _Table, points: _Points) -> None:
    """Reject a table that cannot be interpolated: fewer than two points on an axis."""
    what = f"profile for {table.model} tp={table.tp}: {table.name}" + (
        f" enc_seq={table.enc_seq:g}" if table.enc_seq else ""
    )
    if len(table.axes) == 1:
        if len(points) < 2:
            raise ProfileError(
                f"{what} has {_plural(len(points), table.axes[0] + ' value')} "
                f"({', '.join(f'{x:g}' for x in sorted(points))}); need at least 2 to interpolate"
            )
        return
    rows: dict[float, list[float]] = {}
    for batch, length in points:
        rows.setdefault(batch, []).append(length)
    if len(rows) < 2:
        raise ProfileError(
            f"{what} has {_plural(len(rows), 'batch size')} "
            f"({', '.join(f'{b:g}' for b in sorted(rows))}); need at least 2 to interpolate"
        )
    for batch, lengths in sorted(rows.items()):
        if len(lengths) < 2:
            raise ProfileError(
                f"{what} at batch={batch:g} has {_plural(len(lengths), table.axes[1] + ' value')} "
                f"({', '.join(f'{x:g}' for x in lengths)}); need at least 2 to interpolate"
            )


def _split_times(key: tuple[str, int], tables: dict[str, tuple[_Table, _Points]]) -> SplitLayerTimes:
    missing = {"rest", "attn_prefill", "attn_decode"} - set(tables)
    if missing:
        raise ProfileError(f"split profile for {key[0]} tp={key[1]} lacks {sorted(missing)}")
    for table, points in tables.values():
        _check_dense(table, points)
    return SplitLayerTimes(
        MonotoneCurve.from_points(tables["rest"][1]),
        MonotoneGrid.from_points(tables["attn_prefill"][1]),
        MonotoneGrid.from_points(tables["attn_decode"][1]),
    )


def _whole_times(key: tuple[str, int], tables: dict[tuple[str, float], tuple[_Table, _Points]]) -> WholeLayerTimes:
    if ("prefill", 0.0) not in tables or not any(name == "decode" for name, _ in tables):
        raise ProfileError(f"layer profile for {key[0]} tp={key[1]} needs prefill and decode rows")
    for table, points in tables.values():
        _check_dense(table, points)
    decode = sorted(
        (enc, MonotoneGrid.from_points(points)) for (name, enc), (_, points) in tables.items() if name == "decode"
    )
    return WholeLayerTimes(MonotoneGrid.from_points(tables[("prefill", 0.0)][1]), tuple(decode))


def _step_times(cells: Sequence[_Cell]) -> dict[tuple[str, int], MonotoneCurve]:
    out = {}
    for table, points in _tables(cells).items():
        if table.name == "step":
            _check_dense(table, points)
            out[(table.model, table.tp)] = MonotoneCurve.from_points(points)
    return out


def _layer_times(
    cells: Sequence[_Cell],
) -> tuple[dict[tuple[str, int], SplitLayerTimes], dict[tuple[str, int], WholeLayerTimes]]:
    split: dict[tuple[str, int], dict[str, tuple[_Table, _Points]]] = {}
    whole: dict[tuple[str, int], dict[tuple[str, float], tuple[_Table, _Points]]] = {}
    for table, points in _tables(cells).items():
        key = (table.model, table.tp)
        if table.name == "step":
            continue
        if table.name in ("rest", "attn_prefill", "attn_decode"):
            split.setdefault(key, {})[table.name] = (table, points)
        else:
            whole.setdefault(key, {})[(table.name, table.enc_seq)] = (table, points)
    return ({k: _split_times(k, v) for k, v in split.items()}, {k: _whole_times(k, v) for k, v in whole.items()})


def parse_profile(*texts: str) -> ProfileSet:
    """Parse one or more JSONL profile texts (split and/or whole-layer rows) into tables; the noise
    rule smooths them and its warnings are kept in ``ProfileSet.warnings``."""
    rows = [r for text in texts for r in _parse_lines(text)]
    cells, meta = _cells(rows)
    if not cells:
        raise ProfileError("profile has no model rows")
    cells, warnings = smooth_cells(cells)
    split, whole = _layer_times(cells)
    return ProfileSet(split, whole, meta, warnings, _step_times(cells))
