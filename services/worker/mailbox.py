"""A worker's inbox (deliveries waiting for the next boundary) and outbox (events of one step)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

from common.lifecycle import Stage
from common.messages.events import EventBatch, Failure, Stamp, Token
from common.transport.port import Delivery


class Inbox:
    """Deliveries received since the last boundary, each with the queue it came from; ``wake``
    ends a wait early (stop, a new schedule, an abort)."""

    def __init__(self) -> None:
        self._items: list[tuple[str, Delivery]] = []
        self._signal = asyncio.Event()

    def put(self, item: tuple[str, Delivery]) -> None:
        self._items.append(item)
        self._signal.set()

    def wake(self) -> None:
        self._signal.set()

    def waiting(self) -> bool:
        """Anything received (or a wake-up); a plain read, fine from the engine thread."""
        return bool(self._items) or self._signal.is_set()

    async def wait(self, timeout_s: float | None = None) -> None:
        """Until something arrives or a wake-up (or ``timeout_s`` passes)."""
        if not self._items:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._signal.wait()
            except TimeoutError:
                pass
        self._signal.clear()

    async def settle(self, gap_s: float, limit_s: float) -> None:
        """Requests come in bursts (a client's batch, the answers of a closed loop): after an
        arrival, wait while the next follows within ``gap_s`` (``limit_s`` in all), so that an
        idle worker starts its batch with the burst, not with its first message. A wake-up
        without an arrival ends it (and stays set for the caller)."""
        deadline = time.monotonic() + limit_s
        seen = len(self._items)
        while seen and gap_s > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._signal.clear()
            try:
                async with asyncio.timeout(min(gap_s, left)):
                    await self._signal.wait()
            except TimeoutError:
                return
            if len(self._items) == seen:  # woken for something else
                self._signal.set()
                return
            seen = len(self._items)

    def take(self) -> list[tuple[str, Delivery]]:
        items, self._items = self._items, []
        self._signal.clear()
        return items


@dataclass
class Outbox:
    """Events of one step, grouped by the queue of the submitter that awaits them."""

    tokens: dict[str, list[Token]] = field(default_factory=lambda: defaultdict(list))
    stamps: dict[str, list[Stamp]] = field(default_factory=lambda: defaultdict(list))
    failures: dict[str, list[Failure]] = field(default_factory=lambda: defaultdict(list))

    def token(self, reply_to: str, token: Token) -> None:
        self.tokens[reply_to].append(token)

    def stamp(self, reply_to: str, request_id: str, stage: Stage, at: float | None = None) -> None:
        self.stamps[reply_to].append(Stamp(request_id, stage, time.time() if at is None else at))

    def failure(self, reply_to: str, failure: Failure) -> None:
        self.failures[reply_to].append(failure)

    def batches(self, producer: str, role: str, version: int, size: int) -> dict[str, EventBatch]:
        queues = set(self.tokens) | set(self.stamps) | set(self.failures)
        return {
            q: EventBatch(
                producer,
                role,
                version,
                size,
                tuple(self.tokens.get(q, ())),
                tuple(self.stamps.get(q, ())),
                tuple(self.failures.get(q, ())),
            )
            for q in queues
        }
