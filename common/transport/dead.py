"""The dead queue, read and acted on: what `exegpt dlq list|replay|purge` runs.

Each operation takes every message the dead queue holds (a consumer with a prefetch of its depth,
bounded by ``dead_queue_max``), then settles each one: ``list`` gives them all back, ``replay``
publishes the chosen ones to the queue they came from (as new messages: their attempts start
again at 1) and acks them, ``purge`` acks them all. Run it while nothing else consumes the dead
queue (nothing in the mesh does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from common.names import Names
from common.transport.port import (
    ATTEMPTS_HEADER,
    DEAD_AT_HEADER,
    DEAD_HEADERS,
    DEADLINE_HEADER,
    ID_HEADER,
    ORIGIN_HEADER,
    REASON_HEADER,
    Bus,
    Delivery,
    Subscription,
)

TAKE_TIMEOUT_S = 5.0  # at most this long to receive what the queue's depth said it holds


@dataclass(frozen=True)
class DeadMessage:
    id: str  # the message's id (``x-exegpt-id``); replay --id takes it
    queue: str  # the queue it came from ("" when unknown)
    reason: str
    attempts: int | None
    dead_at: float | None  # epoch seconds
    body: bytes
    headers: Mapping[str, str]

    @classmethod
    def of(cls, delivery: Delivery, index: int) -> DeadMessage:
        headers = delivery.headers
        attempts = headers.get(ATTEMPTS_HEADER, "")
        dead_at = headers.get(DEAD_AT_HEADER, "")
        return cls(
            id=headers.get(ID_HEADER) or f"#{index}",
            queue=headers.get(ORIGIN_HEADER, ""),
            reason=headers.get(REASON_HEADER, "rejected"),
            attempts=int(attempts) if attempts.isdigit() else None,
            dead_at=float(dead_at) if _is_number(dead_at) else None,
            body=delivery.body,
            headers=headers,
        )

    def age_s(self, now: float | None = None) -> float | None:
        return None if self.dead_at is None else max((now or time.time()) - self.dead_at, 0.0)

    def replay_headers(self) -> dict[str, str]:
        """The headers it was first published with (trace context), without those of its death
        and without its deadline (a replay is an operator's explicit decision to run it again)."""
        return {
            k: v
            for k, v in self.headers.items()
            if k not in DEAD_HEADERS and k != DEADLINE_HEADER and not k.startswith("x-death")
        }


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class DeadQueue:
    """The messages of ``names.dead_queue`` taken on ``bus``; settle them with one of the methods."""

    def __init__(self, bus: Bus, names: Names) -> None:
        self.bus, self.names = bus, names
        self.deliveries: list[Delivery] = []
        self.messages: list[DeadMessage] = []
        self._subscription: Subscription | None = None

    async def take(self, timeout_s: float = TAKE_TIMEOUT_S) -> list[DeadMessage]:
        depth = await self.bus.queue_depth(self.names.dead_queue)
        if depth == 0:
            return []
        self._subscription = await self.bus.consume(self.names.dead_queue, prefetch=depth)
        received = aiter(self._subscription)
        try:
            async with asyncio.timeout(timeout_s):
                while len(self.deliveries) < depth:
                    self.deliveries.append(await anext(received))
        except TimeoutError:
            pass  # fewer than the depth said (another reader, or drop-head): what came is enough
        await self._subscription.cancel()  # no more (nor these again) while they are settled
        self.messages = [DeadMessage.of(d, i) for i, d in enumerate(self.deliveries)]
        return self.messages

    async def give_back(self) -> None:
        """Every message stays (newest first: each one goes back to the queue's head)."""
        for delivery in reversed(self.deliveries):
            await delivery.release()

    async def replay(self, ids: set[str] | None) -> tuple[list[DeadMessage], list[tuple[DeadMessage, str]]]:
        """Republish the messages whose id is in ``ids`` (None: all) to their queues; the rest
        stay. Returns (replayed, [(kept, why)] for chosen ones that could not be)."""
        replayed: list[DeadMessage] = []
        kept: list[tuple[DeadMessage, str]] = []
        stay: list[Delivery] = []
        for message, delivery in zip(self.messages, self.deliveries):
            if ids is not None and message.id not in ids:
                stay.append(delivery)
                continue
            if not message.queue:
                kept.append((message, "the queue it came from is unknown"))
                stay.append(delivery)
                continue
            try:
                await self.bus.publish(message.queue, message.body, headers=message.replay_headers() or None)
            except Exception as exc:  # Unroutable: the queue is gone (e.g. a reply queue)
                kept.append((message, f"{type(exc).__name__}: {exc}"))
                stay.append(delivery)
                continue
            await delivery.ack()
            replayed.append(message)
        for delivery in reversed(stay):
            await delivery.release()
        return replayed, kept

    async def purge(self) -> int:
        for delivery in self.deliveries:
            await delivery.ack()
        return len(self.deliveries)
