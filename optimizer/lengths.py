"""Input/output length distributions: the paper's synthetic tasks and empirical ones (traces)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import numpy as np
import numpy.typing as npt
from scipy.special import ndtr


class LengthFunction(Protocol):
    """A vectorised function of lengths (what ``LengthDistribution.expect`` averages)."""

    def __call__(self, lengths: np.ndarray, /) -> npt.ArrayLike: ...


@dataclass(frozen=True)
class LengthDistribution:
    """A distribution over positive integer lengths, as a probability mass function."""

    values: tuple[int, ...]
    probs: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.values or len(self.values) != len(self.probs):
            raise ValueError("a length distribution needs as many values as probabilities, at least one")
        if min(self.values) < 1 or any(b <= a for a, b in zip(self.values, self.values[1:])):
            raise ValueError("lengths must be >= 1 and strictly increasing")
        if min(self.probs) < 0 or not np.isclose(sum(self.probs), 1.0):
            raise ValueError("probabilities must be >= 0 and sum to 1")

    @staticmethod
    def from_weights(values: npt.ArrayLike, weights: npt.ArrayLike) -> LengthDistribution:
        v = np.asarray(values, dtype=int)
        w = np.asarray(weights, dtype=float)
        keep = w > 0
        if not keep.any():
            raise ValueError("a length distribution needs some positive weight")
        return LengthDistribution(tuple(int(x) for x in v[keep]), tuple(float(p) for p in w[keep] / w[keep].sum()))

    @staticmethod
    def truncated_normal(mean: float, std: float, maximum: int) -> LengthDistribution:
        """Normal(mean, std) rounded to integers and truncated to [1, maximum]."""
        if std <= 0 or maximum < 1:
            raise ValueError(f"need std > 0 and maximum >= 1, got std={std}, maximum={maximum}")
        k = np.arange(1, maximum + 1)
        return LengthDistribution.from_weights(k, ndtr((k + 0.5 - mean) / std) - ndtr((k - 0.5 - mean) / std))

    @staticmethod
    def from_samples(samples: npt.ArrayLike) -> LengthDistribution:
        s = np.asarray(samples)
        if s.size == 0 or s.min() < 1 or not np.all(s == np.round(s)):
            raise ValueError("length samples must be a non-empty list of integers >= 1")
        values, counts = np.unique(s.astype(int), return_counts=True)
        return LengthDistribution.from_weights(values, counts)

    @property
    def _v(self) -> np.ndarray:
        return np.asarray(self.values, dtype=float)

    @property
    def _p(self) -> np.ndarray:
        return np.asarray(self.probs, dtype=float)

    def expect(self, f: LengthFunction) -> float:
        """E[f(L)] for a vectorised f."""
        return float(np.dot(self._p, f(self._v)))

    @property
    def mean(self) -> float:
        return self.expect(lambda x: x)

    @property
    def maximum(self) -> int:
        return self.values[-1]

    def quantile(self, q: float) -> int:
        """Smallest length whose cumulative probability reaches ``q``."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        cdf = np.cumsum(self._p)
        return self.values[min(int(np.searchsorted(cdf, q - 1e-12)), len(self.values) - 1)]

    def expected_max(self, n: npt.ArrayLike) -> np.ndarray:
        """E[max of n independent draws], for an array of n."""
        cdf = np.cumsum(self._p)
        below = np.concatenate([[0.0], cdf[:-1]])  # P(L < v_i)
        n = np.asarray(n, dtype=float)[..., None]
        gaps = np.diff(np.concatenate([[0.0], self._v]))
        out: np.ndarray = np.sum(gaps * (1.0 - below**n), axis=-1)
        return out

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(np.asarray(self.values), size=n, p=self._p)


@dataclass(frozen=True)
class Workload:
    """Input and output lengths of a request stream. With ``pairs`` (from a trace), sampling
    draws whole (input, output) rows, keeping their correlation; otherwise the two are independent."""

    name: str
    input: LengthDistribution
    output: LengthDistribution
    pairs: tuple[tuple[int, int], ...] = ()

    @staticmethod
    def from_pairs(name: str, inputs: Sequence[int] | np.ndarray, outputs: Sequence[int] | np.ndarray) -> Workload:
        if len(inputs) != len(outputs):
            raise ValueError("need one output length per input length")
        return Workload(
            name,
            LengthDistribution.from_samples(inputs),
            LengthDistribution.from_samples(outputs),
            tuple(zip((int(i) for i in inputs), (int(o) for o in outputs))),
        )

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.pairs:
            rows = np.asarray(self.pairs)[rng.integers(0, len(self.pairs), size=n)]
            return rows[:, 0], rows[:, 1]
        return self.input.sample(rng, n), self.output.sample(rng, n)


def _task(name: str, inp: tuple[float, float, int], out: tuple[float, float, int]) -> Workload:
    return Workload(name, LengthDistribution.truncated_normal(*inp), LengthDistribution.truncated_normal(*out))


# The paper's tasks (the ExeGPT paper's workloads): (mean, std, max) of input and output lengths.
TASK_LENGTHS: dict[str, tuple[tuple[float, float, int], tuple[float, float, int]]] = {
    "S": ((256, 252, 512), (32, 13, 80)),
    "T": ((128, 81, 256), (128, 68, 320)),
    "G": ((64, 23, 128), (192, 93, 480)),
    "C1": ((256, 115, 512), (64, 30, 160)),
    "C2": ((512, 252, 1024), (256, 134, 640)),
}
TASKS: dict[str, Workload] = {name: _task(name, *lengths) for name, lengths in TASK_LENGTHS.items()}


def scaled_task(name: str, scale: float) -> Workload:
    """A paper task with every length (mean, std, maximum) multiplied by ``scale``, for machines
    that cannot run the original lengths in reasonable time (maximum at least 2)."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if name not in TASK_LENGTHS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_LENGTHS)}")
    if scale == 1:
        return TASKS[name]
    shrink: Callable[[float, float, int], tuple[float, float, int]]
    shrink = lambda m, s, top: (m * scale, s * scale, max(round(top * scale), 2))  # noqa: E731
    inp, out = TASK_LENGTHS[name]
    return _task(f"{name}x{scale:g}", shrink(*inp), shrink(*out))


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # since the first request of the trace
    input_len: int
    output_len: int


def _timestamp_s(text: str) -> float:
    whole, _, frac = text.strip().partition(".")
    return datetime.fromisoformat(whole).timestamp() + (float("0." + frac) if frac else 0.0)


def parse_length_csv(text: str) -> tuple[TraceRequest, ...]:
    """Rows of ``timestamp,input,output`` (the Azure trace) or ``input,output``; a header
    line (any non-numeric first field) is skipped."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = [f.strip() for f in line.split(",")]
        if not line.strip() or (number == 1 and not fields[-1].isdigit()):
            continue
        if len(fields) not in (2, 3) or not (fields[-1].isdigit() and fields[-2].isdigit()):
            raise ValueError(f"line {number}: expected 'timestamp,input,output' or 'input,output'")
        try:
            t = _timestamp_s(fields[0]) if len(fields) == 3 else 0.0
        except ValueError:
            raise ValueError(f"line {number}: bad timestamp {fields[0]!r}") from None
        rows.append(TraceRequest(t, int(fields[-2]), int(fields[-1])))
    valid = [r for r in rows if r.input_len >= 1 and r.output_len >= 1]
    if not valid:
        raise ValueError("no requests with positive input and output lengths")
    t0 = min(r.arrival_s for r in valid)
    return tuple(TraceRequest(r.arrival_s - t0, r.input_len, r.output_len) for r in valid)


def workload_from_trace(name: str, rows: tuple[TraceRequest, ...], max_input: int = 0, max_output: int = 0) -> Workload:
    """Empirical workload; lengths above ``max_input``/``max_output`` (when > 0) are clipped."""
    ins = np.array([r.input_len for r in rows])
    outs = np.array([r.output_len for r in rows])
    if max_input:
        ins = np.minimum(ins, max_input)
    if max_output:
        outs = np.minimum(outs, max_output)
    return Workload.from_pairs(name, ins, outs)
