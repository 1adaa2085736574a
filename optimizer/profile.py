"""XProfiler tables: per-layer step times by phase, batch, length and TP degree.

Two row formats (JSON lines, times in ``ms``; see ../shared/profiles/README.md):

- whole layers: ``{"model", "tp", "phase": prefill|encode|decode, "batch", "seq" | "ctx"
  [, "enc_seq"], "ms"}``
- split, as the ExeGPT profiler measures: ``{"model", "tp", "part": "rest", "tokens", "ms"}`` and
  ``{"part": "attn_prefill" | "attn_encode", "batch", "seq"}`` / ``{"part": "attn_decode",
  "batch", "ctx"}``.

A step's layer time from the split table is rest(all tokens in the step) + attention per shape
(prefill attention at the batch's effective length, decode attention at its mean context; for
T5 decode, cross-attention is costed as decode attention over the encoder length). Rows without a
model (device header, ``probe`` rows) are kept as metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from optimizer.interp import MonotoneCurve, MonotoneGrid

MS = 1e-3


@dataclass(frozen=True)
class StepShape:
    """The work one layer does in one step; fields may be numpy arrays (many steps at once).

    ``prefill_seq`` is the effective prompt length for attention (sqrt of the mean squared
    length, since causal attention grows with its square); ``decode_ctx`` the mean KV length.
    """

    prefill_seqs: object = 0.0
    prefill_tokens: object = 0.0
    prefill_seq: object = 1.0
    decode_seqs: object = 0.0
    decode_ctx: object = 1.0
    enc_seq: object = 0.0  # T5: encoder length seen by cross-attention

    def split(self, parts) -> "StepShape":
        """One of ``parts`` equal micro-batches of this step."""
        return StepShape(self.prefill_seqs / parts, self.prefill_tokens / parts, self.prefill_seq,
                         self.decode_seqs / parts, self.decode_ctx, self.enc_seq)

    @property
    def tokens(self):
        return self.prefill_tokens + self.decode_seqs


class LayerTimes(Protocol):
    def step_s(self, shape: StepShape):
        """Seconds one layer (one TP shard, collectives excluded) takes for ``shape``."""
        ...


def _where_positive(count, value):
    return np.where(np.asarray(count) > 0, value, 0.0)


@dataclass(frozen=True)
class SplitLayerTimes:
    rest: MonotoneCurve
    attn_prefill: MonotoneGrid
    attn_decode: MonotoneGrid

    def step_s(self, shape: StepShape):
        s = shape
        rest = _where_positive(s.tokens, self.rest(np.maximum(s.tokens, 1.0)))
        pre = _where_positive(s.prefill_seqs, self.attn_prefill(np.maximum(s.prefill_seqs, 1e-9),
                                                                s.prefill_seq))
        dec = self.attn_decode(np.maximum(s.decode_seqs, 1e-9), s.decode_ctx)
        cross = _where_positive(s.enc_seq, self.attn_decode(np.maximum(s.decode_seqs, 1e-9),
                                                            np.maximum(s.enc_seq, 1.0)))
        return (rest + pre + _where_positive(s.decode_seqs, dec + cross)) * MS


@dataclass(frozen=True)
class WholeLayerTimes:
    """Whole-layer tables; T5 decode tables are kept per encoder length and interpolated."""

    prefill: MonotoneGrid
    decode_by_enc_seq: tuple[tuple[float, MonotoneGrid], ...]

    def _decode(self, seqs, ctx, enc_seq):
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
        return (lo + frac * np.maximum(hi - lo, 0.0)).reshape(shape)

    def step_s(self, shape: StepShape):
        s = shape
        pseqs = np.maximum(s.prefill_seqs, 1e-9)
        pre = self.prefill(pseqs, np.maximum(s.prefill_tokens / pseqs, 1.0))
        dec = self._decode(np.maximum(s.decode_seqs, 1e-9), s.decode_ctx, s.enc_seq)
        return (_where_positive(s.prefill_seqs, pre) + _where_positive(s.decode_seqs, dec)) * MS


@dataclass(frozen=True)
class ProfileSet:
    """Every model and TP degree found in one or more profile files."""

    split: dict[tuple[str, int], SplitLayerTimes] = field(default_factory=dict)
    whole: dict[tuple[str, int], WholeLayerTimes] = field(default_factory=dict)
    metadata: tuple[dict, ...] = ()

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
        raise ValueError(f"profile has no rows for model {model!r} at tp={tp}; "
                         f"models: {', '.join(self.models()) or 'none'}")

    def probe(self, name: str) -> dict | None:
        return next((row for row in self.metadata if row.get("probe") == name), None)


class ProfileError(ValueError):
    """A profile row that cannot be used; the message names the line."""


def _parse_lines(text: str) -> list[tuple[int, dict]]:
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


_PART_KEYS = {"rest": ("tokens",), "attn_prefill": ("batch", "seq"), "attn_encode": ("batch", "seq"),
              "attn_decode": ("batch", "ctx")}


def _number(row: dict, key: str, number: int) -> float:
    value = row.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ProfileError(f"line {number}: field {key!r} must be a non-negative number, got {value!r}")
    return float(value)


def _row_key(row: dict, number: int) -> tuple[str, int]:
    tp = row.get("tp")
    if not isinstance(tp, int) or tp < 1:
        raise ProfileError(f"line {number}: field 'tp' must be an integer >= 1, got {tp!r}")
    return str(row["model"]), tp


def _collect(rows: list[tuple[int, dict]]):
    parts: dict = {}
    phases: dict = {}
    meta = []
    for number, row in rows:
        if "model" not in row:
            meta.append(row)
            continue
        key = _row_key(row, number)
        ms = _number(row, "ms", number)
        if "part" in row:
            part = row["part"]
            if part not in _PART_KEYS:
                raise ProfileError(f"line {number}: unknown part {part!r}")
            coords = tuple(_number(row, k, number) for k in _PART_KEYS[part])
            part = "attn_prefill" if part == "attn_encode" else part
            parts.setdefault(key, {}).setdefault(part, {})[coords if len(coords) > 1 else coords[0]] = ms
        elif row.get("phase") in ("prefill", "encode"):
            coords = (_number(row, "batch", number), _number(row, "seq", number))
            phases.setdefault(key, {}).setdefault(("prefill", 0.0), {})[coords] = ms
        elif row.get("phase") == "decode":
            coords = (_number(row, "batch", number), _number(row, "ctx", number))
            enc = _number(row, "enc_seq", number) if "enc_seq" in row else 0.0
            phases.setdefault(key, {}).setdefault(("decode", enc), {})[coords] = ms
        else:
            raise ProfileError(f"line {number}: a model row needs 'part' or a phase "
                               f"prefill|encode|decode, got {row.get('phase')!r}")
    return parts, phases, tuple(meta)


def _split_times(key, tables: dict) -> SplitLayerTimes:
    missing = {"rest", "attn_prefill", "attn_decode"} - set(tables)
    if missing:
        raise ProfileError(f"split profile for {key[0]} tp={key[1]} lacks {sorted(missing)}")
    return SplitLayerTimes(MonotoneCurve.from_points(tables["rest"]),
                           MonotoneGrid.from_points(tables["attn_prefill"]),
                           MonotoneGrid.from_points(tables["attn_decode"]))


def _whole_times(key, tables: dict) -> WholeLayerTimes:
    decode = sorted((enc, MonotoneGrid.from_points(t)) for (ph, enc), t in tables.items() if ph == "decode")
    if ("prefill", 0.0) not in tables or not decode:
        raise ProfileError(f"layer profile for {key[0]} tp={key[1]} needs prefill and decode rows")
    return WholeLayerTimes(MonotoneGrid.from_points(tables[("prefill", 0.0)]), tuple(decode))


def parse_profile(*texts: str) -> ProfileSet:
    """Parse one or more JSONL profile texts (split and/or whole-layer rows) into tables."""
    rows = [r for text in texts for r in _parse_lines(text)]
    parts, phases, meta = _collect(rows)
    if not parts and not phases:
        raise ProfileError("profile has no model rows")
    return ProfileSet({k: _split_times(k, v) for k, v in parts.items()},
                      {k: _whole_times(k, v) for k, v in phases.items()}, meta)
