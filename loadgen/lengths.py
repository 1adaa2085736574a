"""Request lengths: how many prompt tokens to send and how many output tokens to force.

The paper's synthetic tasks draw both lengths from normal distributions truncated to [1, max]
(ExeGPT, ASPLOS 2024, its table of tasks). Sampling is pure given a ``numpy.random.Generator``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TruncNormal:
    """A normal distribution of token counts truncated to ``[1, max_tokens]``, rounded to integers."""

    mean: float
    std: float
    max_tokens: int

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Rejection sampling: redraw values outside [1, max] so the shape inside is the normal's."""
        out = np.empty(0, dtype=np.int64)
        for _ in range(1000):  # acceptance is > 50% for every task, so this ends in a few rounds
            if out.size >= count:
                break
            draw = np.rint(rng.normal(self.mean, self.std, size=2 * (count - out.size) + 8))
            keep = draw[(draw >= 1) & (draw <= self.max_tokens)].astype(np.int64)
            out = np.concatenate((out, keep))
        if out.size < count:
            raise ValueError(f"{self} rejects almost every draw")
        return out[:count]


@dataclass(frozen=True)
class TaskLengths:
    """Input and output length distributions of one of the paper's tasks."""

    name: str
    input: TruncNormal
    output: TruncNormal


TASKS: dict[str, TaskLengths] = {
    "S": TaskLengths("summarization", TruncNormal(256, 252, 512), TruncNormal(32, 13, 80)),
    "T": TaskLengths("translation", TruncNormal(128, 81, 256), TruncNormal(128, 68, 320)),
    "G": TaskLengths("code generation", TruncNormal(64, 23, 128), TruncNormal(192, 93, 480)),
    "C1": TaskLengths("conversation short", TruncNormal(256, 115, 512), TruncNormal(64, 30, 160)),
    "C2": TaskLengths("conversation long", TruncNormal(512, 252, 1024), TruncNormal(256, 134, 640)),
}


@dataclass(frozen=True)
class Lengths:
    """Per-request prompt and forced output token counts (equal-length int arrays)."""

    input_tokens: np.ndarray
    output_tokens: np.ndarray

    def __post_init__(self) -> None:
        if self.input_tokens.shape != self.output_tokens.shape:
            raise ValueError("input and output length arrays differ in size")
        if self.input_tokens.size and (self.input_tokens.min() < 1 or self.output_tokens.min() < 1):
            raise ValueError("every length must be >= 1")

    def __len__(self) -> int:
        return int(self.input_tokens.size)

    def head(self, count: int) -> Lengths:
        return Lengths(self.input_tokens[:count], self.output_tokens[:count])


def task_lengths(task: str, count: int, rng: np.random.Generator) -> Lengths:
    try:
        spec = TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}") from None
    return Lengths(spec.input.sample(count, rng), spec.output.sample(count, rng))


def fixed_lengths(input_tokens: int, output_tokens: int, count: int) -> Lengths:
    return Lengths(np.full(count, input_tokens, np.int64), np.full(count, output_tokens, np.int64))


def scale_lengths(lengths: Lengths, factor: float, max_input: int | None = None) -> Lengths:
    """Multiply both lengths by ``factor`` (rounded, at least 1); optionally cap the prompt."""
    if not factor > 0:
        raise ValueError(f"length scale must be > 0, got {factor}")
    inp = np.maximum(1, np.rint(lengths.input_tokens * factor)).astype(np.int64)
    out = np.maximum(1, np.rint(lengths.output_tokens * factor)).astype(np.int64)
    if max_input is not None:
        inp = np.minimum(inp, max_input)
    return Lengths(inp, out)


def fit_context(lengths: Lengths, max_context: int) -> Lengths:
    """Cap each request so that prompt + output tokens fit ``max_context``: the output keeps up to
    ``max_context - 1`` tokens and the prompt is cut to the room that is left (at least 1)."""
    if max_context < 2:
        raise ValueError(f"a context of {max_context} tokens cannot hold a prompt and an output")
    out = np.minimum(lengths.output_tokens, max_context - 1)
    inp = np.minimum(lengths.input_tokens, max_context - out)
    return Lengths(inp, out)


def load_lengths_file(path: Path) -> Lengths:
    """Lengths from a CSV (columns ``input_tokens,output_tokens``) or JSONL (same keys) file."""
    rows: list[tuple[int, int]] = []
    text = Path(path).read_text()
    if Path(path).suffix == ".jsonl":
        for line in text.splitlines():
            if line.strip():
                obj = json.loads(line)
                rows.append((int(obj["input_tokens"]), int(obj["output_tokens"])))
    else:
        for row in csv.DictReader(text.splitlines()):
            rows.append((int(row["input_tokens"]), int(row["output_tokens"])))
    if not rows:
        raise ValueError(f"{path}: no lengths")
    arr = np.asarray(rows, dtype=np.int64)
    return Lengths(arr[:, 0], arr[:, 1])
