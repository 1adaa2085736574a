"""What each step cost, sampled for the scheduler's calibration (``optimizer.calibration``).

A worker runs tens of steps a second; each heartbeat carries a uniform sample of at most
``STEP_COSTS_PER_KIND`` steps of each kind run since the one before (reservoir sampling per
kind), so the status traffic stays one message per ``heartbeat_s`` per worker, of at most
3 x ``STEP_COSTS_PER_KIND`` records, whatever the step rate.
"""

from __future__ import annotations

import math
import random

from common.messages.status import STEP_COSTS_PER_KIND, StepCost
from optimizer.calibration import step_kind
from optimizer.policies import StepPlan


def step_cost(
    plan: StepPlan, prompt_lens: dict[str, int], contexts: list[int], fused: bool, seconds: float, at: float
) -> StepCost:
    """The shape of ``plan`` in the profile's terms: ``prompt_lens`` of the requests it encodes,
    ``contexts`` the KV lengths of those it decodes."""
    prompts = [prompt_lens[rid] for rid in plan.encode if rid in prompt_lens]
    squares = [p * p for p in prompts] + [c.length * (2 * c.start + c.length) for c in plan.chunks]
    n_pre = len(prompts) + len(plan.chunks)
    n_dec = len(plan.decode) + plan.padding
    return StepCost(
        step_kind(n_pre, n_dec),
        fused,
        n_pre,
        sum(prompts) + sum(c.length for c in plan.chunks),
        math.sqrt(sum(squares) / n_pre) if n_pre else 1.0,
        n_dec,
        sum(contexts) / len(contexts) if contexts else 1.0,
        seconds,
        at,
    )


class StepSampler:
    def __init__(self, seed: str, per_kind: int = STEP_COSTS_PER_KIND) -> None:
        self.per_kind = per_kind
        self.rng = random.Random(seed)
        self.kept: dict[str, list[StepCost]] = {}
        self.seen: dict[str, int] = {}

    def note(self, cost: StepCost) -> None:
        kept = self.kept.setdefault(cost.kind, [])
        seen = self.seen[cost.kind] = self.seen.get(cost.kind, 0) + 1
        if len(kept) < self.per_kind:
            kept.append(cost)
        elif (j := self.rng.randrange(seen)) < self.per_kind:
            kept[j] = cost

    def drain(self) -> tuple[StepCost, ...]:
        """The sample since the last drain (and start a new one)."""
        out = tuple(c for kept in self.kept.values() for c in kept)
        self.kept.clear()
        self.seen.clear()
        return out
