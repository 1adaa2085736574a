"""Admission control of one gateway process: what it takes on before any work is queued.

- **In flight**: at most ``max_in_flight`` requests (each choice of ``n`` counts) that this
  gateway's HTTP routes submitted and that have not finished, failed or been aborted.
- **Encode queue**: no new work while the encode queue holds ``max_queue_depth`` messages. The
  depth is read from the broker at most once per ``DEPTH_TTL_S`` (a failed read is remembered as
  long), whatever the request rate; work admitted since the last read counts on top of it.
- **Per key** (only with API keys): a key's owner may have ``key_max_in_flight`` requests in
  flight and submit ``key_tokens_per_minute`` tokens a minute, counted at admission as prompt +
  ``max_tokens`` of each choice, from a token bucket that refills continuously (it holds one
  minute's worth). Keys of one owner share their limits.

A refusal raises ``Refused`` (a 429 with ``Retry-After``); a limit of 0 is no limit. All state
is this process's: N gateways admit up to N times these limits.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from common.config import MeshConfig
from services.front.core import Pending

DEPTH_TTL_S = 0.5  # the encode queue's depth is read from the broker at most this often
DEPTH_TIMEOUT_S = 2.0  # a broker slower than this to answer counts as down
RETRY_AFTER_BUSY_S = 1  # a full gateway or queue: try again this soon


class Refused(Exception):
    """Admission said no: ``reason`` names the limit (a metrics label), ``retry_after_s`` is
    when the request may succeed (None: never at its size)."""

    def __init__(self, reason: str, message: str, retry_after_s: int | None) -> None:
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate_per_s``; starts full."""

    capacity: float
    rate_per_s: float
    level: float = field(init=False)
    at: float = field(init=False)

    def __post_init__(self) -> None:
        self.level, self.at = self.capacity, -math.inf

    def refill(self, now: float) -> None:
        if self.at == -math.inf:
            self.at = now
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate_per_s)
        self.at = now

    def wait_s(self, cost: float) -> float:
        """Seconds until ``cost`` tokens are there (after ``refill``)."""
        return max(cost - self.level, 0.0) / self.rate_per_s


@dataclass(eq=False)
class Ticket:
    """What one admitted HTTP request holds: its choices' slots (in flight until each request
    leaves the gateway's table) and the tokens it was charged."""

    owner: str | None
    slots: int
    tokens: int
    pendings: list[Pending] | None = None  # None until submitted: every slot counts
    admission: Admission | None = None
    cancelled: bool = False

    def live(self, is_live: Callable[[str], bool]) -> int:
        if self.pendings is None:
            return self.slots
        return sum(1 for p in self.pendings if is_live(p.request_id))

    def bind(self, pendings: Sequence[Pending]) -> None:
        """Its requests were submitted: from now on each counts while the gateway has it."""
        self.pendings = list(pendings)

    def cancel(self) -> None:
        """Nothing was submitted after all (a refusal or an outage): free the slots, refund the tokens."""
        if self.admission is not None:
            self.admission.cancel(self)


class Admission:
    """Decides, per HTTP request, whether the gateway takes it on (``check_queue`` then ``admit``)."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        is_live: Callable[[str], bool],
        read_depth: Callable[[], Awaitable[int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_in_flight, self.max_queue_depth = config.max_in_flight, config.max_queue_depth
        self.key_max_in_flight, self.key_tpm = config.key_max_in_flight, config.key_tokens_per_minute
        self.is_live, self.read_depth, self.clock = is_live, read_depth, clock
        self.tickets: set[Ticket] = set()
        self.buckets: dict[str, TokenBucket] = {}
        self._depth: int | BaseException = 0
        self._depth_at = -math.inf
        self._admitted_since_read = 0
        self._depth_lock = asyncio.Lock()

    # --- the encode queue ----------------------------------------------------------------------
    async def queue_depth(self) -> int:
        """The encode queue's depth as last read (at most ``DEPTH_TTL_S`` old), plus what this
        gateway admitted since; a read that failed raises again until the next read is due."""
        async with self._depth_lock:
            if self.clock() - self._depth_at >= DEPTH_TTL_S:
                try:
                    self._depth = await asyncio.wait_for(self.read_depth(), DEPTH_TIMEOUT_S)
                except Exception as exc:
                    self._depth = exc
                self._depth_at, self._admitted_since_read = self.clock(), 0
            if isinstance(self._depth, BaseException):
                raise self._depth
            return self._depth + self._admitted_since_read

    async def check_queue(self) -> None:
        if self.max_queue_depth and (depth := await self.queue_depth()) >= self.max_queue_depth:
            raise Refused(
                "queue_depth",
                f"The server is overloaded: {depth} requests are waiting "
                f"to be encoded (limit {self.max_queue_depth}); retry later",
                RETRY_AFTER_BUSY_S,
            )

    # --- in flight and per key -----------------------------------------------------------------
    def in_flight(self, owner: str | None = None) -> int:
        """Requests in flight (of ``owner``'s keys only, if given); drops finished tickets."""
        total = 0
        for ticket in list(self.tickets):
            live = ticket.live(self.is_live)
            if live == 0:
                self.tickets.discard(ticket)
            elif owner is None or ticket.owner == owner:
                total += live
        return total

    def admit(self, owner: str | None, choices: int, tokens_each: int) -> Ticket:
        """Take a request of ``choices`` requests, each of ``tokens_each`` tokens (prompt +
        max_tokens), for ``owner`` (None: no key); ``Refused`` past a limit. Nothing is held
        when it refuses."""
        cost = choices * tokens_each
        if self.max_in_flight and (busy := self.in_flight()) + choices > self.max_in_flight:
            raise Refused(
                "in_flight",
                f"The server is overloaded: {busy} requests are in flight (limit {self.max_in_flight}); retry later",
                RETRY_AFTER_BUSY_S,
            )
        bucket = None
        if owner is not None:
            if self.key_max_in_flight and (mine := self.in_flight(owner)) + choices > self.key_max_in_flight:
                raise Refused(
                    "key_in_flight",
                    f"Rate limit reached for requests: {mine} in flight "
                    f"for this key, limit {self.key_max_in_flight}"
                    + (f", requested {choices}" if choices > 1 else "")
                    + "; retry when one finished",
                    RETRY_AFTER_BUSY_S,
                )
            if self.key_tpm:
                bucket = self._bucket(owner)
                if cost > bucket.capacity:
                    raise Refused(
                        "key_tokens",
                        f"Request too large for tokens per min: limit "
                        f"{self.key_tpm}, requested {cost} (prompt + max_tokens of each "
                        "choice); lower max_tokens, n or the prompt",
                        None,
                    )
                if (wait := bucket.wait_s(cost)) > 0:
                    raise Refused(
                        "key_tokens",
                        f"Rate limit reached for tokens per min: limit "
                        f"{self.key_tpm}, available {int(bucket.level)}, requested "
                        f"{cost}; retry in {wait:.1f} s",
                        max(1, math.ceil(wait)),
                    )
        if bucket is not None:
            bucket.level -= cost
        self._admitted_since_read += choices
        ticket = Ticket(owner, choices, cost if bucket is not None else 0, admission=self)
        if self.max_in_flight or self.key_max_in_flight:  # else nothing counts them
            self.tickets.add(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        if not ticket.cancelled:
            ticket.cancelled = True
            self.tickets.discard(ticket)
            if ticket.tokens and ticket.owner in self.buckets:
                bucket = self.buckets[ticket.owner]
                bucket.level = min(bucket.capacity, bucket.level + ticket.tokens)

    def _bucket(self, owner: str) -> TokenBucket:
        bucket = self.buckets.get(owner)
        if bucket is None:
            bucket = self.buckets[owner] = TokenBucket(self.key_tpm, self.key_tpm / 60.0)
        bucket.refill(self.clock())
        return bucket
