"""The request lifecycle: one enum of stages, timestamped once, and the latencies derived from it.

::

    ARRIVED ─► QUEUED ─► ENCODE_START ─► ENCODE_END ─► [HANDED_OFF] ─► DECODE_START ─► FINISHED
    (gateway)  (gateway)  (worker or       (worker or     (WAA encoder)   (worker or      (gateway)
                           encoder)         encoder)                       decoder)
                                    FIRST_TOKEN: when the gateway receives token 0

HANDED_OFF only under WAA, where the KV cache moves from an encoder to a decoder; a worker that
decodes what it encodes stamps DECODE_START at its prefill's end.

Stamps are wall-clock seconds (``time.time()``), so stamps taken on different hosts compare as
well as their clocks do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum


class Stage(IntEnum):
    ARRIVED = 1
    QUEUED = 2
    ENCODE_START = 3
    ENCODE_END = 4
    HANDED_OFF = 5
    DECODE_START = 6
    FIRST_TOKEN = 7
    FINISHED = 8


@dataclass
class Timeline:
    """The stamps of one request; the first stamp of a stage wins (redelivery repeats stages)."""

    stamps: dict[Stage, float] = field(default_factory=dict)
    output_tokens: int = 0

    def mark(self, stage: Stage, at: float | None = None) -> None:
        self.stamps.setdefault(stage, time.time() if at is None else at)

    def between(self, start: Stage, end: Stage) -> float | None:
        if start in self.stamps and end in self.stamps:
            return self.stamps[end] - self.stamps[start]
        return None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: arrival to the first token reaching the gateway."""
        return self.between(Stage.ARRIVED, Stage.FIRST_TOKEN)

    @property
    def e2e_s(self) -> float | None:
        """End to end: arrival to the last token."""
        return self.between(Stage.ARRIVED, Stage.FINISHED)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None with fewer than two tokens."""
        decode = self.between(Stage.FIRST_TOKEN, Stage.FINISHED)
        if decode is None or self.output_tokens < 2:
            return None
        return decode / (self.output_tokens - 1)
