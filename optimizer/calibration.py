"""Online calibration of the cost model: what the workers' steps really took against the profile.

A profile is a snapshot of a machine whose speed drifts (other load, clocks, memory, another
build): its step times are often 10-25 % off what a worker measures an hour later. Workers report
the steps they ran (kind, shape, seconds); for each the scheduler computes what the *raw* profile
predicts for that shape (``PipelineTimer`` without calibration) and feeds the ratio here.

The model: a correction factor per step kind (prefill, decode, mixed) and step size, the size
being the tokens a step computes (prompt tokens plus decoded rows) in octaves (bucket
``floor(log2 tokens)``). Each bucket keeps its newest ``RING`` log-ratios with their times, and its
estimate is their **weighted median**, each weighted by ``2^(-age / half_life_s)``:

- robust: a step stalled by a page fault or a collector pause moves a median by one rank, not by
  its size (up to half the recent samples may be outliers);
- decaying: a machine that slows down is followed once the new samples outweigh the old ones (a
  half-life, and a ring, after the change at most);
- by shape: small decode steps are dominated by per-step overhead, large prefills by compute, and
  they drift apart; one global factor would fit neither.

A bucket with little weight is shrunk towards its kind's pooled median (``SHRINK`` samples' worth),
a kind with no sample takes the median over all kinds, and with no sample at all the factor is 1.
Between buckets the log-factor is interpolated over log2(tokens); beyond the outermost ones it is
held; it may fall by at most ``MAX_FALL_PER_OCTAVE`` per octave, so a calibrated step never costs
noticeably less than a smaller one (what the search's bounds rely on). ``table(now)`` freezes the
estimates into a ``CalibrationTable``, which a ``Scenario`` carries and every ``PipelineTimer``
applies to whole steps, so the search, the simulator and the state record all use the calibrated
model.

Pure: no clock (``now`` is passed), no I/O; ``to_plain``/``from_plain`` carry the state to the
store so a new leader starts calibrated.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optimizer.profile import StepShape

KINDS = ("prefill", "decode", "mixed")
RING = 64  # newest samples kept per bucket
SHRINK = 4.0  # a bucket's estimate is pulled towards its kind's by this many samples' weight
MAX_BUCKET = 24  # 2^24 tokens in one step: beyond any real step
MIN_WEIGHT = 0.05  # samples this old (about 4.3 half-lives) no longer count
RATIO_LIMIT = 20.0  # a measured/predicted ratio beyond 20x either way is a broken record, dropped
# The log-factor falls by at most this much per octave of step tokens: a profile's step times grow
# with the tokens, and a steeper fall could make a calibrated step cheaper than a smaller one,
# which the search's bounds assume never happens (``optimizer.analytic.rra_optimistic``).
MAX_FALL_PER_OCTAVE = 0.03


def step_kind(prefill_seqs: float, decode_seqs: float) -> str:
    if prefill_seqs > 0 and decode_seqs > 0:
        return "mixed"
    return "prefill" if prefill_seqs > 0 else "decode"


def bucket_of(tokens: float) -> int:
    return int(min(max(math.floor(math.log2(max(tokens, 1.0))), 0), MAX_BUCKET))


@dataclass(frozen=True)
class KindCurve:
    """One kind's log-factor at bucket positions (log2 tokens at the bucket's middle)."""

    x: tuple[float, ...]
    log_factor: tuple[float, ...]

    def at(self, log2_tokens: np.ndarray) -> np.ndarray:
        if len(self.x) == 1:
            return np.full_like(log2_tokens, self.log_factor[0], dtype=float)
        out: np.ndarray = np.interp(log2_tokens, self.x, self.log_factor)
        return out


@dataclass(frozen=True)
class CalibrationTable:
    """Frozen correction factors: ``factor(shape)`` multiplies a whole step's predicted seconds.
    Vectorised over a ``StepShape`` of arrays; hashable (a ``Scenario`` field)."""

    curves: tuple[tuple[str, KindCurve], ...] = ()
    fallback_log: float = 0.0  # kinds with no sample
    samples: int = 0

    def factor(self, shape: StepShape) -> np.ndarray:
        pre = np.asarray(shape.prefill_seqs, dtype=float)
        dec = np.asarray(shape.decode_seqs, dtype=float)
        tokens = np.asarray(shape.prefill_tokens, dtype=float) + dec
        x = np.log2(np.maximum(tokens, 1.0)) * np.ones(np.broadcast(pre, dec).shape)
        curves = dict(self.curves)
        out = np.full(x.shape, self.fallback_log)
        for kind, mask in (
            ("prefill", (pre > 0) & ~(dec > 0)),
            ("decode", ~(pre > 0)),
            ("mixed", (pre > 0) & (dec > 0)),
        ):
            if kind in curves and np.any(mask):
                out = np.where(mask, curves[kind].at(x), out)
        return np.exp(out)

    def __call__(self, shape: StepShape) -> np.ndarray:
        return self.factor(shape)

    def scalar(self, kind: str, tokens: float) -> float:
        """The factor for one step of ``kind`` over ``tokens`` tokens."""
        shape = {
            "prefill": StepShape(prefill_seqs=1.0, prefill_tokens=tokens),
            "decode": StepShape(decode_seqs=max(tokens, 1.0)),
            "mixed": StepShape(prefill_seqs=1.0, prefill_tokens=max(tokens - 1, 0.0), decode_seqs=1.0),
        }[kind]
        return float(self.factor(shape))

    def summary(self) -> tuple[tuple[str, float, float], ...]:
        """(kind, tokens at the bucket's middle, factor) for every calibrated bucket."""
        return tuple(
            (kind, float(2**x), float(math.exp(v)))
            for kind, curve in self.curves
            for x, v in zip(curve.x, curve.log_factor)
        )


IDENTITY = CalibrationTable()


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    return float(v[int(np.searchsorted(cum, 0.5 * cum[-1]))])


@dataclass
class _Bucket:
    log_ratios: deque[float] = field(default_factory=lambda: deque(maxlen=RING))
    times: deque[float] = field(default_factory=lambda: deque(maxlen=RING))


class Calibration:
    """The online estimator (mutable; one per scheduler). ``observe`` each reported step;
    ``table(now)`` for planning."""

    def __init__(self, half_life_s: float = 60.0) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.half_life_s = half_life_s
        self.buckets: dict[tuple[str, int], _Bucket] = {}
        self.observed = 0
        self.dropped = 0

    def observe(self, kind: str, tokens: float, measured_s: float, predicted_s: float, at: float) -> bool:
        """One step: ``measured_s`` on the worker, ``predicted_s`` by the raw profile for the same
        shape. False (and not counted) for a record that cannot be a real step."""
        if kind not in KINDS:
            raise ValueError(f"unknown step kind {kind!r}; expected one of {KINDS}")
        if not (measured_s > 0 and predicted_s > 0 and math.isfinite(measured_s) and math.isfinite(predicted_s)):
            self.dropped += 1
            return False
        ratio = measured_s / predicted_s
        if not 1 / RATIO_LIMIT <= ratio <= RATIO_LIMIT:
            self.dropped += 1
            return False
        bucket = self.buckets.setdefault((kind, bucket_of(tokens)), _Bucket())
        bucket.log_ratios.append(math.log(ratio))
        bucket.times.append(at)
        self.observed += 1
        return True

    def _weights(self, times: Sequence[float], now: float) -> np.ndarray:
        age = np.maximum(now - np.asarray(times, dtype=float), 0.0)
        return np.exp2(-age / self.half_life_s)

    def _pooled(self, keys: Sequence[tuple[str, int]], now: float) -> tuple[float, float] | None:
        """(weighted median log-ratio, total weight) over the buckets ``keys``; None: no weight."""
        values = [np.asarray(self.buckets[k].log_ratios) for k in keys]
        weights = [self._weights(self.buckets[k].times, now) for k in keys]
        if not values:
            return None
        v, w = np.concatenate(values), np.concatenate(weights)
        keep = w >= MIN_WEIGHT
        if not np.any(keep):
            return None
        return weighted_median(v[keep], w[keep]), float(w[keep].sum())

    def table(self, now: float) -> CalibrationTable:
        everything = self._pooled(list(self.buckets), now)
        if everything is None:
            return IDENTITY
        curves = []
        for kind in KINDS:
            keys = sorted(k for k in self.buckets if k[0] == kind)
            pooled = self._pooled(keys, now)
            if pooled is None:
                continue
            xs, logs = [], []
            for key in keys:
                own = self._pooled([key], now)
                if own is None:
                    continue
                value, weight = own
                xs.append(key[1] + 0.5)
                logs.append((weight * value + SHRINK * pooled[0]) / (weight + SHRINK))
            for i in range(1, len(logs)):
                logs[i] = max(logs[i], logs[i - 1] - MAX_FALL_PER_OCTAVE * (xs[i] - xs[i - 1]))
            curves.append((kind, KindCurve(tuple(xs), tuple(logs))))
        return CalibrationTable(tuple(curves), everything[0], int(round(everything[1])))

    # --- carried between processes ---------------------------------------------------------------
    def to_plain(self) -> dict[str, Any]:
        return {
            "half_life_s": self.half_life_s,
            "buckets": [[kind, b, list(v.log_ratios), list(v.times)] for (kind, b), v in self.buckets.items()],
        }

    @staticmethod
    def from_plain(plain: dict[str, Any]) -> Calibration:
        cal = Calibration(float(plain["half_life_s"]))
        for kind, b, logs, times in plain["buckets"]:
            if kind not in KINDS or len(logs) != len(times):
                raise ValueError(f"not a calibration bucket: {kind!r} with {len(logs)} values, {len(times)} times")
            bucket = cal.buckets.setdefault((kind, int(b)), _Bucket())
            bucket.log_ratios.extend(float(x) for x in logs)
            bucket.times.extend(float(t) for t in times)
        return cal
