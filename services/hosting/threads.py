"""How many torch threads each engine step runs with: the team, or one thread when the cores are
contended.

A torch engine on the CPU computes each step's operators with an OpenMP team whose threads spin
between the step's parallel regions. On cores of its own the team is the fastest way to run a step
(SmolLM2 int4, one stream, 2 threads: 13.5 ms against 17.5 ms on one thread). When other work wants
the same cores, a team thread loses its core in the middle of a step and the others wait for it at
the next barrier: with a busy process beside a served SmolLM2 on 2 cores, a step took 51-59 ms with
the team against 19-21 ms when the governor moved it to one thread, which waits for nobody
(docs/engine.md, Served speed). (Two teams in one process, as when the engine is loaded on one thread
and stepped on another, make OpenMP put idle threads to sleep after every region; that is robust
but cost 24 ms on a quiet machine. The runner therefore loads and steps on one thread.)

``ThreadGovernor`` chooses per step from what it measured: for each kind of step (``key``: say,
decode of 8 rows) it keeps a moving average of the seconds a step took with the team and with one
thread, runs the faster, and every ``explore_every``-th step of that kind runs the other once, so
that it notices when the contention starts or ends (such a try replaces the other's average: what
it measured before is from another time). Pure logic: the runner applies the choice
(``torch.set_num_threads``) and reports the time.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

EXPLORE_EVERY = 16  # steps of one kind between two tries of the choice not in use
SMOOTHING = 0.3  # weight of a new step time in its moving average


@dataclass
class _Kind:
    steps: int = 0
    average_s: dict[int, float] = field(default_factory=dict)  # threads -> moving average of a step's seconds


class ThreadGovernor:
    def __init__(self, threads: int, explore_every: int = EXPLORE_EVERY, smoothing: float = SMOOTHING) -> None:
        if threads < 1 or explore_every < 2 or not 0 < smoothing <= 1:
            raise ValueError("need threads >= 1, explore_every >= 2 and smoothing in (0, 1]")
        self.choices = (threads, 1) if threads > 1 else (1,)
        self.explore_every = explore_every
        self.smoothing = smoothing
        self._kinds: dict[Hashable, _Kind] = {}

    def choose(self, key: Hashable) -> int:
        """Threads for the next step of kind ``key``."""
        if len(self.choices) == 1:
            return self.choices[0]
        kind = self._kinds.setdefault(key, _Kind())
        untried = [n for n in self.choices if n not in kind.average_s]
        if untried:
            return untried[0]  # the team first, then one thread
        best = self.best(key)
        if kind.steps % self.explore_every == self.explore_every - 1:
            return next(n for n in self.choices if n != best)
        return best

    def record(self, key: Hashable, threads: int, seconds: float) -> None:
        """A step of kind ``key`` ran with ``threads`` threads in ``seconds``."""
        if len(self.choices) == 1:
            return
        kind = self._kinds.setdefault(key, _Kind())
        kind.steps += 1
        before = kind.average_s.get(threads)
        tried = len(kind.average_s) == len(self.choices) and threads != self.best(key)
        # a try of the choice not in use stands for it alone: its old average is from another time
        kind.average_s[threads] = seconds if before is None or tried else before + self.smoothing * (seconds - before)

    def best(self, key: Hashable) -> int:
        """The choice measured faster for ``key`` (the team until both were measured)."""
        averages = self._kinds[key].average_s if key in self._kinds else {}
        if len(averages) < len(self.choices):
            return self.choices[0]
        return min(self.choices, key=lambda n: averages[n])

    def state(self) -> dict[str, dict[int, float]]:
        """Each kind's averages, for the metrics."""
        return {str(key): dict(kind.average_s) for key, kind in self._kinds.items()}


def step_key(prefill_rows: int, decode_rows: int) -> tuple[str, int]:
    """The kind of a step for the governor: prefill or decode, and its rows to the next power of two
    (steps of one kind take about the same time)."""
    rows = max(prefill_rows + decode_rows, 1)
    return ("prefill" if prefill_rows else "decode", 1 << (rows - 1).bit_length())
