"""What the dashboard remembers between polls: the scheduler's figures over time and its re-plans.

``History.observe`` takes the JSON form of the current ``ScheduleUpdate`` and ``SchedulerState``
(``services.gateway.admin.jsonable``), at most once per ``every_s``, and keeps:

- ``points``: every numeric field of the state at that moment (whatever fields the record has,
  so a record that grows new figures is charted without a change here), in a bounded ring;
- ``timeline``: what changed between two looks: a search (its reason, outcome and the version in
  force after it), a new schedule version (with what changed: the schedule, the workers, a pin),
  a new latency bound; also bounded.

Plain data in, plain data out: no clock of its own, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

POINTS_MAX = 600  # ten minutes at one look a second
TIMELINE_MAX = 200
STATE_WAIT_S = 3.0  # how long a new version waits on the timeline for the state record that explains it


def numeric_fields(state: dict[str, Any], prefix: str = "", depth: int = 1) -> dict[str, float]:
    """The state's numbers (booleans as 0/1), and those of objects ``depth`` levels down as
    ``outer.inner`` (calibration factors, ...); lists and text are left out."""
    out: dict[str, float] = {}
    for key, value in state.items():
        if isinstance(value, (bool, int, float)):
            out[prefix + key] = float(value)
        elif isinstance(value, dict) and depth > 0:
            out.update(numeric_fields(value, f"{prefix}{key}.", depth - 1))
    return out


def _value(v: Any) -> str:
    """A schedule field's value in a sentence: floats to three significant digits."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def version_change(
    before: dict[str, Any] | None, after: dict[str, Any], pinned_before: bool | None, pinned_after: bool | None
) -> str:
    """Why schedule version ``after`` replaced ``before`` (both ``ScheduleUpdate`` JSON), in words.
    Versions published between two looks show as one change."""
    if before is None:
        return "in force when the dashboard first looked"
    causes = []
    if pinned_after and not pinned_before:
        causes.append("pinned")
    elif pinned_before and not pinned_after:
        causes.append("unpinned")
    old, new = before.get("schedule") or {}, after.get("schedule") or {}
    if old.get("policy") != new.get("policy"):
        causes.append(f"schedule {old.get('policy')} -> {new.get('policy')}")
    elif old != new:
        # the control variables first; what the plan expects (mean_*) only where nothing else moved
        changed = sorted((k for k in new if old.get(k) != new.get(k)), key=lambda k: k.startswith("mean_"))
        causes.append(
            ", ".join(f"{k} {_value(old.get(k))} -> {_value(new.get(k))}" for k in changed[:3])
            + (f" (+{len(changed) - 3} more)" if len(changed) > 3 else "")
        )
    workers_before = {a["worker_id"] for a in before.get("allocation") or ()}
    workers_after = {a["worker_id"] for a in after.get("allocation") or ()}
    if workers_before != workers_after:
        causes.append(f"workers {len(workers_before)} -> {len(workers_after)}")
    elif before.get("allocation") != after.get("allocation"):
        causes.append("roles")
    if before.get("token") != after.get("token"):
        causes.append("new scheduler leader")
    return ", ".join(causes) or "republished"


@dataclass
class History:
    every_s: float = 1.0
    points: deque[dict[str, float]] = field(default_factory=lambda: deque(maxlen=POINTS_MAX))
    timeline: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=TIMELINE_MAX))
    _last_at: float = float("-inf")
    _update: dict[str, Any] | None = None
    _state: dict[str, Any] | None = None
    _seq: int = 0  # each timeline entry's number, so a client asks for the ones after it has
    _update_seen_at: float | None = None  # when a version not yet on the timeline was first seen

    def observe(self, update: dict[str, Any] | None, state: dict[str, Any] | None, now: float) -> None:
        if now - self._last_at < self.every_s:
            return
        self._last_at = now
        if state is not None and (self._state is None or state.get("updated_at") != self._state.get("updated_at")):
            self.points.append({**numeric_fields(state), "at": now})
        self._note_search(state)
        noted = self._note_version(update, state, now)
        self._note_bound(state)
        self._update, self._state = (update or self._update) if noted else self._update, state or self._state

    def _note_search(self, state: dict[str, Any] | None) -> None:
        if state is None or not state.get("last_replan_at"):
            return
        previous = self._state or {}
        search = ("replans", "last_replan_at")
        if [state.get(k) for k in search] == [previous.get(k) for k in search]:
            return
        self._add(
            {
                "kind": "search",
                "at": state["last_replan_at"],
                "version": state.get("version"),
                "reason": state.get("last_replan_reason", ""),
                "outcome": state.get("last_outcome", ""),
            }
        )

    def _note_version(self, update: dict[str, Any] | None, state: dict[str, Any] | None, now: float) -> bool:
        """A new version on the timeline; False while it waits for the state record that goes with
        it (the scheduler publishes a version, then records why: a pin read from the record before
        would be missed), at most ``STATE_WAIT_S``."""
        if update is None or (
            self._update is not None
            and update.get("version") == self._update.get("version")
            and update.get("epoch") == self._update.get("epoch")
        ):
            self._update_seen_at = None
            return True
        behind = state is not None and (state.get("version") or 0) < (update.get("version") or 0)
        if self._update_seen_at is None:
            self._update_seen_at = now
        if behind and now - self._update_seen_at < STATE_WAIT_S:
            return False
        self._update_seen_at = None
        pinned_before = (self._state or {}).get("pinned")
        pinned_after = (state or {}).get("pinned")
        self._add(
            {
                "kind": "version",
                "at": update.get("published_at"),
                "version": update.get("version"),
                "policy": (update.get("schedule") or {}).get("policy"),
                "reason": version_change(self._update, update, pinned_before, pinned_after),
            }
        )
        return True

    def _note_bound(self, state: dict[str, Any] | None) -> None:
        if state is None or self._state is None:
            return
        before, after = self._state.get("latency_bound_s"), state.get("latency_bound_s")
        if before != after:
            self._add(
                {
                    "kind": "bound",
                    "at": state.get("updated_at"),
                    "version": state.get("version"),
                    "reason": f"latency bound {_seconds(before)} -> {_seconds(after)}",
                }
            )

    def _add(self, entry: dict[str, Any]) -> None:
        self._seq += 1
        self.timeline.append({"seq": self._seq, **entry})

    def points_after(self, at: float) -> list[dict[str, float]]:
        return [p for p in self.points if p["at"] > at]

    def timeline_after(self, seq: int) -> list[dict[str, Any]]:
        return [e for e in self.timeline if e["seq"] > seq]


def _seconds(bound: Any) -> str:
    return "none" if bound is None else f"{bound:g} s"
