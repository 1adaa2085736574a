"""Building a workload from its description: lengths, prompts and arrivals, from one seed.

The seed is split into independent streams for lengths, prompts and arrivals, so the same seed
sends the same requests at every rate of a sweep: only their timing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadgen import arrivals
from loadgen.client import RequestSpec
from loadgen.lengths import (
    Lengths,
    fit_context,
    fixed_lengths,
    load_lengths_file,
    scale_lengths,
    task_lengths,
)
from loadgen.prompts import make_prompts
from loadgen.runner import Workload
from loadgen.trace import Trace, load_trace


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that decides which requests are sent and when."""

    num_requests: int
    seed: int = 0
    arrival: arrivals.ArrivalKind = "poisson"
    rate_per_s: float | None = None  # open-loop arrivals other than the trace
    burstiness: float = 1.0  # gamma shape
    concurrency: int | None = None  # closed loop
    task: str | None = "S"  # paper task; or lengths from the trace, a file, or fixed values
    lengths_file: Path | None = None
    fixed_input_tokens: int | None = None
    fixed_output_tokens: int | None = None
    trace_file: Path | None = None
    time_scale: float = 1.0  # trace replay speed-up
    length_scale: float = 1.0  # multiply every length
    max_input_tokens: int | None = None  # cap prompts (to fit a small model's context)
    max_context: int | None = None  # cap prompt + output tokens of each request

    @property
    def lengths_source(self) -> str:
        """Where the lengths come from, in a few words (for titles)."""
        if self.fixed_input_tokens is not None or self.fixed_output_tokens is not None:
            return f"fixed {self.fixed_input_tokens or 1}/{self.fixed_output_tokens or 1} tokens"
        if self.lengths_file is not None:
            return f"lengths {self.lengths_file.name}"
        if self.trace_file is not None:
            return f"trace {self.trace_file.name}"
        return f"task {self.task}"

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.arrival == "trace" and self.trace_file is None:
            raise ValueError("trace arrivals need a trace file")
        if self.arrival == "closed" and not self.concurrency:
            raise ValueError("closed-loop arrivals need a concurrency")
        if self.arrival in ("poisson", "gamma", "constant") and self.rate_per_s is None:
            raise ValueError(f"{self.arrival} arrivals need a rate")


def _lengths(spec: WorkloadSpec, trace: Trace | None, rng: np.random.Generator) -> Lengths:
    n = spec.num_requests
    if spec.fixed_input_tokens is not None or spec.fixed_output_tokens is not None:
        base = fixed_lengths(spec.fixed_input_tokens or 1, spec.fixed_output_tokens or 1, n)
    elif spec.lengths_file is not None:
        base = load_lengths_file(spec.lengths_file)
        base = Lengths(np.resize(base.input_tokens, n), np.resize(base.output_tokens, n))
    elif trace is not None:
        base = trace.lengths
    elif spec.task is not None:
        base = task_lengths(spec.task, n, rng)
    else:
        raise ValueError("no length source: give a task, a trace, a lengths file or fixed lengths")
    scaled = scale_lengths(base, spec.length_scale, spec.max_input_tokens)
    return scaled if spec.max_context is None else fit_context(scaled, spec.max_context)


def _offsets(spec: WorkloadSpec, trace: Trace | None, rng: np.random.Generator) -> np.ndarray | None:
    n, rate = spec.num_requests, spec.rate_per_s
    if spec.arrival == "closed":
        return None
    if spec.arrival == "trace":
        assert trace is not None
        return arrivals.trace_arrivals(trace.timestamps_s, spec.time_scale)
    assert rate is not None
    if spec.arrival == "poisson":
        return arrivals.poisson_arrivals(rate, n, rng)
    if spec.arrival == "gamma":
        return arrivals.gamma_arrivals(rate, spec.burstiness, n, rng)
    return arrivals.constant_arrivals(rate, n)


def build_workload(
    spec: WorkloadSpec,
    encode: Callable[[str], Sequence[int]] | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> Workload:
    """The requests and their timing; exact-length prompts when a tokenizer is given."""
    length_rng, prompt_rng, arrival_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(3))
    trace = None
    if spec.trace_file is not None:
        trace = load_trace(spec.trace_file, limit=spec.num_requests)
    lengths = _lengths(spec, trace, length_rng)
    offsets = _offsets(spec, trace, arrival_rng)
    count = min(spec.num_requests, len(lengths), len(offsets) if offsets is not None else 1 << 62)
    prompts = make_prompts(lengths.input_tokens[:count], prompt_rng, encode, decode)
    specs = tuple(
        RequestSpec(i, prompts[i], int(lengths.input_tokens[i]), int(lengths.output_tokens[i])) for i in range(count)
    )
    if offsets is None:
        return Workload(specs, concurrency=spec.concurrency)
    return Workload(specs, offsets_s=offsets[:count])
