"""What a finished request leaves in the store (its done marker and length sample) while the
store does not answer: kept here, written when it answers again.

A finished request whose events were confirmed has its answer; only its record waits. Its message
is acked all the same: requeued, it would run again and again while the outage lasts (a
redelivery's done marker cannot be read either, and its attempts cannot be counted), and the
requests that finished during the outage would all run once more when the store came back,
starving new ones. A marker only guards a redelivery and a sample only feeds statistics, so past
``limit`` the oldest are dropped.
"""

from __future__ import annotations

import logging
from collections import deque

from common.names import DONE_TTL_S, OUTPUT_LENGTHS_MAX, Names
from common.transport.port import Store

log = logging.getLogger(__name__)
KEPT_MAX = 10_000  # records kept while the store is out


class UnwrittenRecords:
    def __init__(self, store: Store, names: Names, limit: int = KEPT_MAX) -> None:
        self.store, self.names = store, names
        self.waiting: deque[tuple[str, bytes | None]] = deque(maxlen=limit)

    async def write(self, request_id: str, sample: bytes | None) -> None:
        """Mark ``request_id`` done (once) and record its length ``sample``; raises what the store raised."""
        await self.store.set_once_and_record(
            self.names.done(request_id),
            b"1",
            ttl_s=DONE_TTL_S,
            list_key=self.names.output_lengths,
            item=sample,
            max_len=OUTPUT_LENGTHS_MAX,
        )

    def keep(self, request_id: str, sample: bytes | None) -> None:
        self.waiting.append((request_id, sample))

    async def flush(self) -> int:
        """Write what waits, oldest first, until the store fails again; how many were written."""
        written = 0
        while self.waiting:
            request_id, sample = self.waiting[0]
            try:
                await self.write(request_id, sample)
            except Exception as exc:
                log.debug("records still unwritten (%r): %d waiting", exc, len(self.waiting))
                break
            self.waiting.popleft()
            written += 1
        return written
