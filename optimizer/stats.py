"""Streaming statistics of finished requests: lengths, their correlation, arrivals, latency.

The scheduler service feeds every finished request to ``StreamingStats.observe`` and reads the
estimates back; several schedulers or workers can each keep one and ``merge`` them. Every piece of
state is bounded and mergeable:

- two ``LengthHistogram`` s (input, output) with one fixed bin layout shared by all instances:
  1024 bins x 8 bytes = 8 KiB each (exact bins for lengths 1..256, then 768 geometric bins of
  ratio 2**(1/64) up to 2**20; longer lengths fall into the last bin);
- six floats of decayed moments (input/output means and co-moments) for the Pearson correlation;
- a sorted list of the newest ``arrival_capacity`` (512) ``submitted_at`` stamps: 4 KiB of
  floats (about 16 KiB as Python objects);
- a ring of the newest ``ring_capacity`` (2048) raw (input, output, submitted_at, finished_at)
  rows, a 2048 x 4 float64 array (64 KiB), for pairs that keep their correlation, throughput and
  latency quantiles.

About 100 KiB in all with the default capacities, however many requests are observed.

Decay: a sample observed at time t weighs 2**((t - t_ref) / half_life_s); when that exponent
grows past 64 the reference moves forward and every stored weight is rescaled. Ratios of weights
therefore depend only on the samples' times, so an old sample's weight halves every half-life in
whatever order observations and merges happen. Times are always arguments (unix seconds); nothing
here reads a clock.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from optimizer.lengths import LengthDistribution, Workload

EXACT_MAX = 256
MAX_LENGTH = 2**20
BINS_PER_OCTAVE = 64


def _bin_layout() -> tuple[np.ndarray, np.ndarray]:
    """Inclusive upper length of every bin, and its representative length."""
    octaves = int(math.log2(MAX_LENGTH // EXACT_MAX))
    k = np.arange(1, octaves * BINS_PER_OCTAVE + 1)
    geometric = np.floor(EXACT_MAX * 2.0 ** (k / BINS_PER_OCTAVE)).astype(np.int64)
    upper = np.concatenate([np.arange(1, EXACT_MAX + 1), geometric])
    lower = np.concatenate([[1], upper[:-1] + 1])
    return upper, np.round((lower + upper) / 2).astype(np.int64)


_UPPER, _REPRESENTATIVE = _bin_layout()
_UPPER_LIST = _UPPER.tolist()
N_BINS = len(_UPPER)  # 1024


def bin_index(length: int) -> int:
    """The bin holding ``length`` (>= 1; lengths above 2**20 go to the last bin)."""
    if length < 1:
        raise ValueError(f"lengths must be >= 1, got {length}")
    if length <= EXACT_MAX:
        return int(length) - 1
    return min(bisect.bisect_left(_UPPER_LIST, length), N_BINS - 1)


class LengthHistogram:
    """Float weights over the fixed bin layout; ``add``, ``merge`` and ``scale`` work in place.

    ``quantile`` is exact for lengths up to 256; above, it returns the representative (middle) of
    the bin that holds the true weighted quantile, so its relative error is below the bin's
    relative width, 2**(1/64) - 1 = 1.09 % (below 0.7 % with this layout's integer edges).
    ``mean`` is exact: a weighted sum of the lengths, clipped at 2**20, is kept beside the bins.
    """

    def __init__(self) -> None:
        self._weights = np.zeros(N_BINS)
        self._length_sum = 0.0

    def add(self, length: int, weight: float = 1.0) -> None:
        self._weights[bin_index(length)] += weight
        self._length_sum += weight * min(length, MAX_LENGTH)

    def merge(self, other: LengthHistogram) -> None:
        self._weights += other._weights
        self._length_sum += other._length_sum

    def scale(self, factor: float) -> None:
        self._weights *= factor
        self._length_sum *= factor

    def copy(self) -> LengthHistogram:
        twin = LengthHistogram()
        twin.merge(self)
        return twin

    @property
    def weights(self) -> np.ndarray:
        """A read-only view of the bin weights (index with ``bin_index``)."""
        view = self._weights.view()
        view.flags.writeable = False
        return view

    @property
    def total(self) -> float:
        return float(self._weights.sum())

    @property
    def mean(self) -> float:
        total = self.total
        return self._length_sum / total if total > 0 else math.nan

    def quantile(self, q: float) -> int:
        """Smallest bin representative whose cumulative weight reaches ``q`` of the total."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self.total <= 0:
            raise ValueError("quantile of an empty histogram")
        cdf = np.cumsum(self._weights)
        at = int(np.searchsorted(cdf, q * cdf[-1] * (1 - 1e-12)))
        at += int(np.flatnonzero(self._weights[at:])[0])
        return int(_REPRESENTATIVE[at])

    def to_distribution(self) -> LengthDistribution:
        """One representative length per non-empty bin (bins are disjoint: no two coincide)."""
        return LengthDistribution.from_weights(_REPRESENTATIVE, self._weights)

    def to_plain(self) -> dict[str, Any]:
        nonzero = np.flatnonzero(self._weights)
        return {"bins": nonzero.tolist(), "weights": self._weights[nonzero].tolist(), "length_sum": self._length_sum}

    @staticmethod
    def from_plain(plain: dict[str, Any]) -> LengthHistogram:
        hist = LengthHistogram()
        hist._weights[np.asarray(plain["bins"], dtype=np.int64)] = plain["weights"]
        hist._length_sum = float(plain["length_sum"])
        return hist


class _Moments:
    """Weighted means and co-moments of (x, y): West's update, Chan's merge."""

    def __init__(self, values: tuple[float, ...] = (0.0,) * 6) -> None:
        self.weight, self.mean_x, self.mean_y, self.cxx, self.cyy, self.cxy = values

    def add(self, x: float, y: float, w: float) -> None:
        self.weight += w
        dx, dy = x - self.mean_x, y - self.mean_y
        self.mean_x += dx * w / self.weight
        self.mean_y += dy * w / self.weight
        self.cxx += w * dx * (x - self.mean_x)
        self.cyy += w * dy * (y - self.mean_y)
        self.cxy += w * dx * (y - self.mean_y)

    def merge(self, other: _Moments, factor: float = 1.0) -> None:
        wa, wb = self.weight, other.weight * factor
        if wb <= 0:
            return
        total = wa + wb
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        self.mean_x += dx * wb / total
        self.mean_y += dy * wb / total
        self.cxx += other.cxx * factor + dx * dx * wa * wb / total
        self.cyy += other.cyy * factor + dy * dy * wa * wb / total
        self.cxy += other.cxy * factor + dx * dy * wa * wb / total
        self.weight = total

    def scale(self, factor: float) -> None:
        self.weight *= factor
        self.cxx *= factor
        self.cyy *= factor
        self.cxy *= factor

    def correlation(self) -> float:
        denominator = math.sqrt(self.cxx * self.cyy)
        return self.cxy / denominator if denominator > 0 else math.nan

    def to_plain(self) -> list[float]:
        return [self.weight, self.mean_x, self.mean_y, self.cxx, self.cyy, self.cxy]


class _Ring:
    """The newest ``capacity`` rows of (input, output, submitted_at, finished_at), as floats."""

    def __init__(self, capacity: int) -> None:
        self._data = np.zeros((capacity, 4))
        self._appended = 0

    def append(self, row: tuple[float, float, float, float]) -> None:
        self._data[self._appended % len(self._data)] = row
        self._appended += 1

    def rows(self) -> np.ndarray:
        """(n, 4), in the order appended, oldest first."""
        capacity = len(self._data)
        if self._appended <= capacity:
            return self._data[: self._appended].copy()
        return np.roll(self._data, -(self._appended % capacity), axis=0)

    def replace(self, rows: np.ndarray) -> None:
        """Keep the last ``capacity`` of ``rows`` (n, 4)."""
        kept = rows[-len(self._data) :]
        self._data[: len(kept)] = kept
        self._appended = len(kept)


@dataclass(frozen=True)
class Rows:
    """Raw finished requests from the ring: in the order observed (by finished_at after a merge)."""

    input_len: np.ndarray
    output_len: np.ndarray
    submitted_at: np.ndarray
    finished_at: np.ndarray


@dataclass(frozen=True)
class LengthSummary:
    mean: float
    p50: int
    p90: int
    p99: int


@dataclass(frozen=True)
class StatsSummary:
    samples: float  # decayed total weight at ``now`` (a fresh sample weighs 1)
    input: LengthSummary
    output: LengthSummary
    correlation: float  # Pearson, input vs output, decayed
    arrival_rate_per_s: float
    arrival_cv: float


_MAX_EXPONENT = 64.0


class StreamingStats:
    """Decaying, bounded, mergeable statistics of finished requests (see the module docstring).

    ``merge`` works in place and leaves ``other`` untouched; both must share ``half_life_s``; the
    merged state keeps this instance's capacities.
    """

    def __init__(self, half_life_s: float = 300.0, arrival_capacity: int = 512, ring_capacity: int = 2048) -> None:
        if half_life_s <= 0 or arrival_capacity < 3 or ring_capacity < 1:
            raise ValueError(
                f"need half_life_s > 0, arrival_capacity >= 3, ring_capacity >= 1; got "
                f"{half_life_s}, {arrival_capacity}, {ring_capacity}"
            )
        self.half_life_s = float(half_life_s)
        self.arrival_capacity = arrival_capacity
        self.ring_capacity = ring_capacity
        self.input = LengthHistogram()
        self.output = LengthHistogram()
        self._moments = _Moments()
        self._t_ref: float | None = None
        self._arrivals: list[float] = []  # sorted, newest ``arrival_capacity``
        self._ring = _Ring(ring_capacity)

    # -- observing and merging -------------------------------------------------------------

    def observe(self, input_len: int, output_len: int, submitted_at: float, finished_at: float) -> None:
        w = self._weight_at(finished_at)
        self.input.add(input_len, w)
        self.output.add(output_len, w)
        self._moments.add(input_len, output_len, w)
        self._add_arrival(submitted_at)
        self._ring.append((input_len, output_len, submitted_at, finished_at))

    def merge(self, other: StreamingStats) -> None:
        if other.half_life_s != self.half_life_s:
            raise ValueError(f"cannot merge half-lives {self.half_life_s} and {other.half_life_s}")
        if other._t_ref is not None:
            self._merge_weighted(other, other._t_ref)
        self._arrivals = list(heapq.merge(self._arrivals, other._arrivals))[-self.arrival_capacity :]
        rows = np.concatenate([self._ring.rows(), other._ring.rows()])
        self._ring.replace(rows[np.argsort(rows[:, 3], kind="stable")])

    def _merge_weighted(self, other: StreamingStats, their_ref: float) -> None:
        """Merge ``other``'s weighted figures, whose weights are relative to ``their_ref``."""
        if self._t_ref is None:
            self._t_ref = their_ref
        self._move_reference(max(self._t_ref, their_ref))
        factor = 2.0 ** ((their_ref - self._t_ref) / self.half_life_s)
        for mine, theirs in ((self.input, other.input), (self.output, other.output)):
            scaled = theirs.copy()
            scaled.scale(factor)
            mine.merge(scaled)
        self._moments.merge(other._moments, factor)

    def _weight_at(self, t: float) -> float:
        if self._t_ref is None:
            self._t_ref = float(t)
        exponent = (t - self._t_ref) / self.half_life_s
        if exponent > _MAX_EXPONENT:
            self._move_reference(float(t))
            exponent = 0.0
        weight: float = 2.0**exponent  # float ** float is typed Any (a negative base gives a complex)
        return weight

    def _move_reference(self, t: float) -> None:
        assert self._t_ref is not None  # (a reference is set before weights are moved to another)
        factor = 2.0 ** ((self._t_ref - t) / self.half_life_s)
        self.input.scale(factor)
        self.output.scale(factor)
        self._moments.scale(factor)
        self._t_ref = t

    def _add_arrival(self, stamp: float) -> None:
        if len(self._arrivals) == self.arrival_capacity:
            if stamp <= self._arrivals[0]:
                return  # older than every stamp kept
            self._arrivals.pop(0)
        bisect.insort(self._arrivals, float(stamp))

    # -- reading ---------------------------------------------------------------------------

    def decayed_weight(self, now: float) -> float:
        """Total weight seen from ``now``: a sample observed at ``now`` counts 1."""
        if self._t_ref is None:
            return 0.0
        return float(self.input.total * 2.0 ** ((self._t_ref - now) / self.half_life_s))

    def correlation(self) -> float:
        return self._moments.correlation()

    @property
    def arrival_stamps(self) -> tuple[float, ...]:
        return tuple(self._arrivals)

    def arrival_rate(self, now: float) -> float:
        """Requests per second over the buffered arrival stamps: (n - 1) / span. Once the newest
        stamp is older than the span (traffic stopped), the rate falls as (n - 1) / (now - newest).

        Requests still in flight are missing from the buffer's newest end, so the rate is low by
        about (mean latency of the missing ones) / span; keep the span several latencies long."""
        if len(self._arrivals) < 2:
            return 0.0
        first, last = self._arrivals[0], self._arrivals[-1]
        span = max(last - first, now - last)
        return (len(self._arrivals) - 1) / span if span > 0 else math.inf

    def arrival_cv(self) -> float:
        """std / mean of the gaps between consecutive sorted arrivals (Poisson: 1; bursty: > 1)."""
        if len(self._arrivals) < 3:
            return math.nan
        gaps = np.diff(self._arrivals)
        return float(gaps.std() / gaps.mean()) if gaps.mean() > 0 else math.nan

    def rows(self) -> Rows:
        columns = self._ring.rows()
        return Rows(columns[:, 0].astype(np.int64), columns[:, 1].astype(np.int64), columns[:, 2], columns[:, 3])

    def recent(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Input and output lengths of the newest ``n`` rows (at most the ring's capacity)."""
        rows = self.rows()
        start = max(len(rows.input_len) - n, 0)
        return rows.input_len[start:], rows.output_len[start:]

    def since(self, t: float) -> Rows:
        """Rows in the ring that finished at or after ``t``."""
        rows = self.rows()
        keep = rows.finished_at >= t
        return Rows(rows.input_len[keep], rows.output_len[keep], rows.submitted_at[keep], rows.finished_at[keep])

    def throughput(self, now: float, window_s: float) -> float:
        """Finished requests per second over (now - window_s, now]; a lower bound when the ring
        holds fewer rows than finished in the window."""
        finished = self.rows().finished_at
        return float(np.count_nonzero((finished > now - window_s) & (finished <= now)) / window_s)

    def latency_quantile(self, q: float) -> float:
        """q-quantile of finished_at - submitted_at over the ring (nan when empty)."""
        rows = self.rows()
        if not len(rows.finished_at):
            return math.nan
        return float(np.quantile(rows.finished_at - rows.submitted_at, q))

    def workload(self, name: str, recent: int | None = None) -> Workload:
        """From the newest ``recent`` raw pairs (keeps the correlation), else from the two
        decayed histograms (input and output independent)."""
        if recent:
            return Workload.from_pairs(name, *self.recent(recent))
        return Workload(name, self.input.to_distribution(), self.output.to_distribution())

    def summary(self, now: float) -> StatsSummary:
        return StatsSummary(
            self.decayed_weight(now),
            _length_summary(self.input),
            _length_summary(self.output),
            self.correlation(),
            self.arrival_rate(now),
            self.arrival_cv(),
        )

    # -- travelling between processes ------------------------------------------------------

    def to_plain(self) -> dict[str, Any]:
        """Plain dicts, lists and numbers (msgpack- and JSON-able)."""
        return {
            "version": 1,
            "half_life_s": self.half_life_s,
            "arrival_capacity": self.arrival_capacity,
            "ring_capacity": self.ring_capacity,
            "t_ref": self._t_ref,
            "input": self.input.to_plain(),
            "output": self.output.to_plain(),
            "moments": self._moments.to_plain(),
            "arrivals": list(self._arrivals),
            "rows": [[int(i), int(o), s, f] for i, o, s, f in self._ring.rows().tolist()],
        }

    @staticmethod
    def from_plain(plain: dict[str, Any]) -> StreamingStats:
        if plain.get("version") != 1:
            raise ValueError(f"unknown StreamingStats version {plain.get('version')!r}")
        stats = StreamingStats(plain["half_life_s"], plain["arrival_capacity"], plain["ring_capacity"])
        stats._t_ref = plain["t_ref"]
        stats.input = LengthHistogram.from_plain(plain["input"])
        stats.output = LengthHistogram.from_plain(plain["output"])
        stats._moments = _Moments(tuple(float(v) for v in plain["moments"]))
        stats._arrivals = sorted(float(s) for s in plain["arrivals"])[-stats.arrival_capacity :]
        stats._ring.replace(np.asarray(plain["rows"], dtype=float).reshape(-1, 4))
        return stats


def _length_summary(hist: LengthHistogram) -> LengthSummary:
    if hist.total <= 0:
        return LengthSummary(math.nan, 0, 0, 0)
    return LengthSummary(hist.mean, hist.quantile(0.5), hist.quantile(0.9), hist.quantile(0.99))
