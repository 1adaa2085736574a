"""Serving metrics from per-request lifecycle timestamps. Pure: no clock, no I/O.

Each request is recorded once as a ``RequestRecord`` (when it was sent, when each streamed chunk
arrived, when it ended, how it failed); every metric is derived from those timestamps:

- TTFT: first chunk − sent.                 - E2E: end − sent.
- TPOT: (end − first chunk) / (output tokens − 1), for requests with more than one output token.
- ITL: gaps between successive chunks, pooled over requests.
- throughput: completed requests (or their output tokens) / run duration, where the duration runs
  from the first send to the last end of any request.
- goodput: requests that completed and met every given SLO / run duration; attainment is the same
  count over all requests (a failed request never meets an SLO).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RequestRecord:
    """One request's lifecycle, in seconds from the start of the run."""

    index: int
    sent_s: float
    end_s: float
    input_tokens: int  # prompt tokens requested (or reported by the server when it says)
    output_tokens: int  # output tokens received
    chunk_times_s: tuple[float, ...] = ()  # arrival of each streamed chunk that carried text
    error: str | None = None  # error kind, None when the request completed
    error_message: str | None = None  # the server's (or the client's) words about the failure

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] - self.sent_s if self.ok and self.chunk_times_s else None

    @property
    def e2e_s(self) -> float | None:
        return self.end_s - self.sent_s if self.ok else None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or not self.chunk_times_s or self.output_tokens < 2:
            return None
        return (self.end_s - self.chunk_times_s[0]) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        if not self.ok:
            return []
        return [b - a for a, b in zip(self.chunk_times_s, self.chunk_times_s[1:])]


@dataclass(frozen=True)
class Slo:
    """Service-level objectives; ``None`` means no bound on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met_by(self, rec: RequestRecord) -> bool:
        if not rec.ok:
            return False
        # TTFT or E2E that cannot be measured fails its bound; TPOT of a single-token request is
        # undefined and cannot violate a per-token bound.
        checks = (
            (self.ttft_ms, rec.ttft_s, False),
            (self.tpot_ms, rec.tpot_s, True),
            (self.e2e_ms, rec.e2e_s, False),
        )
        for bound_ms, value_s, missing_ok in checks:
            if bound_ms is None:
                continue
            if value_s is None:
                if missing_ok:
                    continue
                return False
            if value_s * 1000.0 > bound_ms * (1 + 1e-9):  # inclusive, float noise aside
                return False
        return True


@dataclass(frozen=True)
class Stat:
    """Summary of one latency metric, in milliseconds; all ``None`` when there were no samples."""

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @staticmethod
    def of(values_s: list[float]) -> Stat:
        if not values_s:
            return Stat(0, None, None, None, None, None)
        ms = np.asarray(values_s, dtype=float) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return Stat(len(ms), float(ms.mean()), float(p50), float(p90), float(p99), float(ms.max()))


@dataclass(frozen=True)
class Summary:
    requests: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    request_throughput: float  # completed requests / s
    output_token_throughput: float  # output tokens of completed requests / s
    input_token_throughput: float  # prompt tokens of completed requests / s
    ttft: Stat
    tpot: Stat
    itl: Stat
    e2e: Stat
    slo: Slo = field(default_factory=Slo)
    slo_met: int = 0
    slo_attainment: float = 0.0  # slo_met / requests
    goodput: float = 0.0  # slo_met / duration_s, requests/s
    # one message per error kind, as the server (or the client) wrote it for the first such failure
    error_messages: dict[str, str] = field(default_factory=dict)

    @property
    def top_error(self) -> tuple[str, int, str | None] | None:
        """The most common error kind, its count and a message of it; None when nothing failed."""
        if not self.errors:
            return None
        kind = max(self.errors, key=lambda k: self.errors[k])
        return kind, self.errors[kind], self.error_messages.get(kind)


def _first_messages(records: list[RequestRecord]) -> dict[str, str]:
    messages: dict[str, str] = {}
    for r in sorted(records, key=lambda r: r.index):
        if r.error is not None and r.error_message and r.error not in messages:
            messages[r.error] = r.error_message
    return dict(sorted(messages.items()))


def summarize(records: list[RequestRecord], slo: Slo = Slo()) -> Summary:
    """Every metric of one run. With no SLO given, every completed request counts as met."""
    ok = [r for r in records if r.ok]
    duration = (max(r.end_s for r in records) - min(r.sent_s for r in records)) if records else 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    met = sum(1 for r in records if slo.met_by(r))
    return Summary(
        requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=dict(sorted(Counter(r.error for r in records if r.error is not None).items())),
        duration_s=duration,
        request_throughput=per_s(len(ok)),
        output_token_throughput=per_s(sum(r.output_tokens for r in ok)),
        input_token_throughput=per_s(sum(r.input_tokens for r in ok)),
        ttft=Stat.of([v for r in ok if (v := r.ttft_s) is not None]),
        tpot=Stat.of([v for r in ok if (v := r.tpot_s) is not None]),
        itl=Stat.of([v for r in ok for v in r.itls_s]),
        e2e=Stat.of([v for r in ok if (v := r.e2e_s) is not None]),
        slo=slo,
        slo_met=met,
        slo_attainment=met / len(records) if records else 0.0,
        goodput=per_s(met),
        error_messages=_first_messages(records),
    )
