"""Has the traffic's length distribution drifted from the one the schedule was planned for?

A two-sample test of the current window against the reference sample the schedule was planned
on: Kolmogorov–Smirnov (``scipy.stats.ks_2samp``) on input lengths and on output lengths
separately, Bonferroni-combined: p = min(2 x min(p_in, p_out), 1); the statistic is the larger D.

Lengths are integers, so both samples have ties. KS p-values assume continuous data; with ties the
test is conservative (true false-alarm rate below the nominal level), which, with Bonferroni and
``DriftMonitor``'s confirmation on consecutive checks, keeps re-planning storms away on noise.

``DriftMonitor`` is state in, verdict out: no clock (``now`` is an argument), no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import ks_2samp

Lengths = Sequence[float] | np.ndarray  # a sample of lengths: a list or an array


@dataclass(frozen=True)
class ShiftTest:
    statistic: float  # the larger KS D of inputs and outputs (nan when not enough)
    p_value: float  # Bonferroni over the two tests (1.0 when not enough)
    enough: bool  # both samples hold at least ``min_samples``


def length_shift_test(
    ref_inputs: Lengths, ref_outputs: Lengths, inputs: Lengths, outputs: Lengths, min_samples: int = 30
) -> ShiftTest:
    """KS on inputs and on outputs of ``(inputs, outputs)`` against the reference, combined."""
    if min(len(ref_inputs), len(ref_outputs), len(inputs), len(outputs)) < min_samples:
        return ShiftTest(math.nan, 1.0, False)
    on_inputs = ks_2samp(ref_inputs, inputs)
    on_outputs = ks_2samp(ref_outputs, outputs)
    p_value = min(2.0 * min(on_inputs.pvalue, on_outputs.pvalue), 1.0)
    return ShiftTest(float(max(on_inputs.statistic, on_outputs.statistic)), float(p_value), True)


Reason = Literal[
    "no reference", "not enough samples", "not significant", "confirming", "holding off", "fired", "awaiting rebase"
]


@dataclass(frozen=True)
class DriftResult:
    statistic: float
    p_value: float
    significant: bool  # this check alone, at ``alpha``
    fired: bool  # re-plan now
    enough: bool
    reason: Reason


class DriftMonitor:
    """Fires when the shift test is significant at ``alpha`` on ``confirm`` consecutive checks and
    at least ``min_interval_s`` have passed since the last ``rebase`` or firing; once fired, it
    stays quiet until the next ``rebase``. A check without enough samples breaks the streak.

    Feed it disjoint windows (e.g. ``StreamingStats.since`` the previous check): overlapping
    windows share samples, so their consecutive verdicts are not independent confirmations.
    """

    def __init__(
        self, alpha: float = 1e-3, min_samples: int = 30, confirm: int = 2, min_interval_s: float = 5.0
    ) -> None:
        if not 0 < alpha < 1 or min_samples < 1 or confirm < 1 or min_interval_s < 0:
            raise ValueError(
                f"need 0 < alpha < 1, min_samples >= 1, confirm >= 1, min_interval_s >= 0; "
                f"got {alpha}, {min_samples}, {confirm}, {min_interval_s}"
            )
        self.alpha = alpha
        self.min_samples = min_samples
        self.confirm = confirm
        self.min_interval_s = min_interval_s
        self._reference: tuple[np.ndarray, np.ndarray] | None = None
        self._last_event_s = -math.inf
        self._streak = 0
        self._fired = False

    def rebase(self, inputs: Lengths, outputs: Lengths, now: float) -> None:
        """The schedule was (re)planned at ``now`` on these lengths."""
        if len(inputs) != len(outputs):
            raise ValueError(f"need one output per input, got {len(inputs)} and {len(outputs)}")
        self._reference = (np.array(inputs), np.array(outputs))
        self._last_event_s = now
        self._streak = 0
        self._fired = False

    def check(self, window_inputs: Lengths, window_outputs: Lengths, now: float) -> DriftResult:
        if self._reference is None:
            return DriftResult(math.nan, 1.0, False, False, False, "no reference")
        test = length_shift_test(*self._reference, window_inputs, window_outputs, self.min_samples)
        significant = test.enough and test.p_value < self.alpha
        reason = self._advance(test.enough, significant, now)
        return DriftResult(test.statistic, test.p_value, significant, reason == "fired", test.enough, reason)

    def _advance(self, enough: bool, significant: bool, now: float) -> Reason:
        if self._fired:
            return "awaiting rebase"
        if not significant:
            self._streak = 0
            return "not significant" if enough else "not enough samples"
        self._streak += 1
        if self._streak < self.confirm:
            return "confirming"
        if now - self._last_event_s < self.min_interval_s:
            return "holding off"
        self._fired = True
        self._last_event_s = now
        return "fired"
