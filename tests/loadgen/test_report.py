"""The printed summary: goodput and SLO attainment only when an SLO was given."""

import io

import pytest
from rich.console import Console

from loadgen import report
from loadgen.metrics import RequestRecord, Slo, summarize
from loadgen.search import RatePoint


def _records():
    return [
        RequestRecord(
            i,
            sent_s=0.1 * i,
            end_s=0.1 * i + 0.5,
            input_tokens=8,
            output_tokens=4,
            chunk_times_s=tuple(0.1 * i + t for t in (0.05, 0.2, 0.35, 0.5)),
        )
        for i in range(5)
    ]


def _text(table) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    return console.file.getvalue()


@pytest.mark.parametrize("slo, shown", [(Slo(), False), (Slo(ttft_ms=100.0), True)])
def test_summary_shows_goodput_only_with_an_slo(slo, shown):
    text = _text(report.summary_table(summarize(_records(), slo), "run"))
    assert "req/s" in text and "out tok/s" in text
    assert ("goodput" in text) is shown and ("SLO attainment" in text) is shown


@pytest.mark.parametrize("slo, shown", [(Slo(), False), (Slo(e2e_ms=1000.0), True)])
def test_rates_table_shows_goodput_only_with_an_slo(slo, shown):
    points = [RatePoint(r, summarize(_records(), slo)) for r in (1.0, 2.0)]
    text = _text(report.rates_table(points, "sweep"))
    assert "TTFT50" in text
    assert ("good" in text) is shown and ("attain" in text) is shown
