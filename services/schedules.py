"""The schedule as the optimizer plans it (``optimizer.schedule.Schedule``) and as the mesh
carries it (``common.messages.schedule.ScheduleSpec``), converted where a service meets the wire:
what arrives is checked by the planner's own rules here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from common.messages.schedule import ScheduleSpec
from common.scheduling import DEFAULT_SCHEDULE
from optimizer.schedule import Schedule


def wire_schedule(s: Schedule) -> ScheduleSpec:
    return ScheduleSpec(**dataclasses.asdict(s))


def planned(spec: ScheduleSpec) -> Schedule:
    """``spec`` as the planner's schedule; ValueError naming what the planner refuses in it."""
    try:
        return Schedule(**dataclasses.asdict(spec))
    except TypeError as exc:  # a value of the wrong type
        raise ValueError(f"not a schedule: {exc}") from None


def parse_schedule(text: str) -> Schedule:
    """A schedule from JSON (an object of ``Schedule`` fields, or ``exegpt plan --json``'s output,
    whose "schedule" it takes) or from a file holding it; ValueError for anything else."""
    source = Path(text).read_text() if not text.lstrip().startswith("{") else text
    try:
        fields = json.loads(source)
        if isinstance(fields, dict) and isinstance(fields.get("schedule"), dict):
            fields = fields["schedule"]
        return Schedule(**fields)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a schedule: {exc}") from None


DEFAULT = planned(DEFAULT_SCHEDULE)  # common.scheduling's default, as the planner's schedule
