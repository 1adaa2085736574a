"""Presenting results: a rich summary table, JSON and CSV files, PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from loadgen.metrics import RequestRecord, Stat, Summary
from loadgen.search import BisectionResult, RatePoint


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def failure_line(summary: Summary) -> str | None:
    """How many requests failed and the most common failure with the server's message; None when
    every request completed."""
    if not summary.failed:
        return None
    line = f"{summary.failed}/{summary.requests} requests failed ({summary.failed / summary.requests:.0%})"
    if (top := summary.top_error) is not None:
        kind, count, message = top
        line += f"; most common: {kind} ×{count}" + (f": {message}" if message else "")
    return line


def failure_note(summaries: Sequence[Summary]) -> str:
    """A short note for a plot title: failed/sent over the runs and the most common error kind."""
    failed, sent = sum(s.failed for s in summaries), sum(s.requests for s in summaries)
    if not failed:
        return ""
    kinds: dict[str, int] = {}
    for s in summaries:
        for kind, n in s.errors.items():
            kinds[kind] = kinds.get(kind, 0) + n
    return f"{failed}/{sent} failed (mostly {max(kinds, key=lambda k: kinds[k])})"


def summary_table(summary: Summary, title: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("metric")
    for col in ("mean", "p50", "p90", "p99", "max"):
        table.add_column(f"{col} ms", justify="right")
    stats: list[tuple[str, Stat]] = [
        ("TTFT", summary.ttft),
        ("TPOT", summary.tpot),
        ("ITL", summary.itl),
        ("E2E", summary.e2e),
    ]
    for name, st in stats:
        table.add_row(name, _ms(st.mean_ms), _ms(st.p50_ms), _ms(st.p90_ms), _ms(st.p99_ms), _ms(st.max_ms))
    table.caption = (
        f"{summary.completed}/{summary.requests} completed in {summary.duration_s:.2f} s · "
        f"{summary.request_throughput:.2f} req/s · {summary.output_token_throughput:.1f} out tok/s"
        # goodput counts requests meeting the SLO: without one it would only repeat the throughput
        + (
            f" · goodput {summary.goodput:.2f} req/s (SLO attainment {summary.slo_attainment:.1%})"
            if summary.slo.any
            else ""
        )
        + (f" · errors {summary.errors}" if summary.errors else "")
    )
    table.caption_justify = "left"
    return table


def rates_table(points: Sequence[RatePoint], title: str) -> Table:
    with_slo = any(p.summary.slo.any for p in points)  # goodput and attainment only against an SLO
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.caption = (
        "rate, req/s" + (", goodput" if with_slo else "") + " in requests/s; tok/s: output tokens/s; latencies in ms"
    )
    table.caption_justify = "left"
    for col in (
        "rate",
        "done",
        "req/s",
        "tok/s",
        *(("good", "attain") if with_slo else ()),
        "TTFT50",
        "TTFT99",
        "TPOT50",
        "TPOT99",
        "E2E99",
        "err",
    ):
        table.add_column(col, justify="right", no_wrap=True)
    for p in points:
        s = p.summary
        table.add_row(
            f"{p.rate_per_s:g}",
            f"{s.completed}/{s.requests}",
            f"{s.request_throughput:.2f}",
            f"{s.output_token_throughput:.1f}",
            *((f"{s.goodput:.2f}", f"{s.slo_attainment:.0%}") if with_slo else ()),
            _ms(s.ttft.p50_ms),
            _ms(s.ttft.p99_ms),
            _ms(s.tpot.p50_ms),
            _ms(s.tpot.p99_ms),
            _ms(s.e2e.p99_ms),
            str(sum(s.errors.values())),
        )
    return table


def record_row(rec: RequestRecord) -> dict[str, Any]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000.0, 4)

    return {
        "index": rec.index,
        "sent_s": round(rec.sent_s, 6),
        "end_s": round(rec.end_s, 6),
        "input_tokens": rec.input_tokens,
        "output_tokens": rec.output_tokens,
        "ttft_ms": ms(rec.ttft_s),
        "tpot_ms": ms(rec.tpot_s),
        "e2e_ms": ms(rec.e2e_s),
        "error": rec.error or "",
        "error_message": rec.error_message or "",
    }


def results_payload(
    config: dict[str, Any],
    runs: Sequence[tuple[float | None, Summary, Sequence[RequestRecord], int]],
    bisection: BisectionResult | None = None,
) -> dict[str, Any]:
    """``runs``: (rate or None, summary, records, not sent) for each run, in the order made."""
    payload: dict[str, Any] = {
        "config": config,
        "runs": [
            {
                "rate_per_s": rate,
                "not_sent": not_sent,
                "summary": asdict(summary),
                "requests": [record_row(r) | {"itls_ms": [round(v * 1000, 4) for v in r.itls_s]} for r in records],
            }
            for rate, summary, records, not_sent in runs
        ],
    }
    if bisection is not None:
        payload["bisection"] = {
            "target_attainment": bisection.target_attainment,
            "max_rate_per_s": bisection.max_rate_per_s,
            "tried": [[p.rate_per_s, p.attainment] for p in bisection.points],
        }
    return payload


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


def write_requests_csv(path: Path, runs: Sequence[tuple[float | None, Sequence[RequestRecord]]]) -> None:
    fields = ["rate_per_s", *record_row(RequestRecord(0, 0, 0, 0, 0)).keys()]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for rate, records in runs:
            for rec in records:
                writer.writerow({"rate_per_s": "" if rate is None else rate} | record_row(rec))


def write_rates_csv(path: Path, points: Sequence[tuple[float | None, Summary]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "rate_per_s",
                "requests",
                "completed",
                "failed",
                "duration_s",
                "request_throughput",
                "output_token_throughput",
                "goodput",
                "slo_attainment",
                "ttft_p50_ms",
                "ttft_p99_ms",
                "tpot_p50_ms",
                "tpot_p99_ms",
                "itl_p50_ms",
                "e2e_p50_ms",
                "e2e_p99_ms",
            ]
        )
        for rate, s in points:
            writer.writerow(
                [
                    rate,
                    s.requests,
                    s.completed,
                    s.failed,
                    round(s.duration_s, 4),
                    round(s.request_throughput, 4),
                    round(s.output_token_throughput, 3),
                    round(s.goodput, 4),
                    round(s.slo_attainment, 4),
                    s.ttft.p50_ms,
                    s.ttft.p99_ms,
                    s.tpot.p50_ms,
                    s.tpot.p99_ms,
                    s.itl.p50_ms,
                    s.e2e.p50_ms,
                    s.e2e.p99_ms,
                ]
            )


def plot_cdfs(path: Path, runs: Sequence[tuple[str, Sequence[RequestRecord]]], title: str | None = None) -> None:
    """Empirical CDFs of TTFT, TPOT and E2E of the completed requests, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, attr) in zip(axes, (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s"))):
        for label, records in runs:
            values = np.sort([v * 1000 for r in records if (v := getattr(r, attr)) is not None])
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=label)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Title": title} if title else None)
    plt.close(fig)


def plot_rates(path: Path, points: Sequence[tuple[float, Summary]], title: str | None = None) -> None:
    """Throughput and goodput against the offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(points, key=lambda p: p[0])
    rates = [p[0] for p in pts]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rates, [s.request_throughput for _, s in pts], "o-", label="throughput")
    ax.plot(rates, [s.goodput for _, s in pts], "s-", label="goodput (all SLOs met)")
    ax.plot(rates, rates, ":", color="grey", label="offered")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("completed req/s")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Title": title} if title else None)
    plt.close(fig)
