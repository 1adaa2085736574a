"""Which live worker has which role under a schedule: pure, deterministic, few moves.

Under RRA, static and continuous every worker is a "worker". Under WAA the live workers are split
in the schedule's proportion of encoders to decoders (at least one of each); workers keep the role
they had where they can, the others are taken in the order of their ids. With fewer than two live
workers WAA cannot run: the schedule falls back to continuous batching with the same batch sizes
(``Allocation.fallback`` says so) until a second worker joins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from common.messages.control import RoleAssignment
from optimizer.schedule import Schedule


@dataclass(frozen=True)
class Allocation:
    schedule: Schedule  # what the workers run (the pinned one, or its fallback)
    roles: tuple[RoleAssignment, ...]
    fallback: bool = False


def encoders_wanted(schedule: Schedule, workers: int) -> int:
    share = schedule.encoder_workers / schedule.workers
    return min(max(round(workers * share), 1), workers - 1)


def allocate(schedule: Schedule, live: Sequence[str], previous: Mapping[str, str]) -> Allocation:
    """Roles for ``live`` worker ids under ``schedule``; ``previous`` maps ids to their roles now."""
    ids = sorted(set(live))
    if not schedule.split:
        return Allocation(schedule, tuple(RoleAssignment(w, "worker") for w in ids))
    if len(ids) < 2:
        alone = replace(
            schedule, policy="continuous", num_devices=1, encoder_devices=0, decoder_devices=1, worker_devices=1
        )
        return Allocation(alone, tuple(RoleAssignment(w, "worker") for w in ids), fallback=True)
    wanted = encoders_wanted(schedule, len(ids))
    keep = [w for w in ids if previous.get(w) == "encoder"][:wanted]
    fresh = [w for w in ids if w not in keep and previous.get(w) != "decoder"]
    movers = [w for w in ids if w not in keep and previous.get(w) == "decoder"]
    encoders = set(keep + (fresh + movers)[: wanted - len(keep)])
    return Allocation(schedule, tuple(RoleAssignment(w, "encoder" if w in encoders else "decoder") for w in ids))
