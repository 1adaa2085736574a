import pytest

from loadgen.metrics import RequestRecord, Slo, Stat, summarize


def rec(index, sent, chunks, end, out=None, error=None, inp=10):
    out = len(chunks) if out is None else out
    return RequestRecord(index, sent, end, inp, out if error is None else 0, tuple(chunks), error)


# Three completed requests and one failure, with round numbers (seconds):
#   r0: sent 0.0, chunks at 0.1, 0.2, 0.3, 0.4, end 0.4  -> TTFT 100 ms, TPOT 100 ms, E2E 400 ms
#   r1: sent 1.0, chunks at 1.3, 1.5, end 1.5             -> TTFT 300 ms, TPOT 200 ms, E2E 500 ms
#   r2: sent 2.0, chunk at 2.2, end 2.2 (one token)      -> TTFT 200 ms, no TPOT,   E2E 200 ms
#   r3: sent 3.0, failed with http_500 at 4.0
RECORDS = [
    rec(0, 0.0, [0.1, 0.2, 0.3, 0.4], 0.4),
    rec(1, 1.0, [1.3, 1.5], 1.5),
    rec(2, 2.0, [2.2], 2.2),
    rec(3, 3.0, [], 4.0, error="http_500"),
]


def test_per_request_metrics_are_exact():
    r0, r1, r2, r3 = RECORDS
    assert r0.ttft_s == pytest.approx(0.1) and r0.tpot_s == pytest.approx(0.1)
    assert r0.itls_s == pytest.approx([0.1, 0.1, 0.1]) and r0.e2e_s == pytest.approx(0.4)
    assert r1.tpot_s == pytest.approx(0.2) and r1.itls_s == pytest.approx([0.2])
    assert r2.tpot_s is None and r2.itls_s == []
    assert r3.ttft_s is None and r3.e2e_s is None and not r3.ok


def test_summary_is_exact():
    s = summarize(RECORDS)
    assert (s.requests, s.completed, s.failed) == (4, 3, 1)
    assert s.errors == {"http_500": 1}
    assert s.duration_s == pytest.approx(4.0)
    assert s.request_throughput == pytest.approx(3 / 4.0)
    assert s.output_token_throughput == pytest.approx(7 / 4.0)
    assert s.input_token_throughput == pytest.approx(30 / 4.0)
    assert s.ttft.count == 3 and s.ttft.mean_ms == pytest.approx(200.0)
    assert s.ttft.p50_ms == pytest.approx(200.0) and s.ttft.max_ms == pytest.approx(300.0)
    # linear interpolation: p90 of [100, 200, 300] = 200 + 0.8 * 100
    assert s.ttft.p90_ms == pytest.approx(280.0) and s.ttft.p99_ms == pytest.approx(298.0)
    assert s.tpot.count == 2 and s.tpot.mean_ms == pytest.approx(150.0)
    assert s.itl.count == 4 and s.itl.mean_ms == pytest.approx(125.0)
    assert s.e2e.mean_ms == pytest.approx(1100 / 3)
    # no SLO: every completed request counts as met; the failure does not
    assert s.slo_met == 3 and s.slo_attainment == pytest.approx(0.75)
    assert s.goodput == pytest.approx(0.75)


def test_usage_count_beats_chunk_count_for_tpot():
    # a server that sends two tokens per chunk: 5 tokens in 3 chunks
    r = rec(0, 0.0, [0.1, 0.3, 0.5], 0.5, out=5)
    assert r.tpot_s == pytest.approx(0.4 / 4)


@pytest.mark.parametrize(
    "slo, met",
    [
        (Slo(ttft_ms=250), 2),  # r0 (100) and r2 (200)
        (Slo(tpot_ms=150), 2),  # r0 (100) and r2 (undefined TPOT cannot violate)
        (Slo(e2e_ms=450), 2),  # r0 (400) and r2 (200)
        (Slo(ttft_ms=250, tpot_ms=150, e2e_ms=300), 1),  # only r2
        (Slo(ttft_ms=300, tpot_ms=200, e2e_ms=500), 3),  # bounds are inclusive
        (Slo(ttft_ms=50), 0),
    ],
)
def test_goodput_counts_requests_meeting_every_slo(slo, met):
    s = summarize(RECORDS, slo)
    assert s.slo_met == met
    assert s.goodput == pytest.approx(met / 4.0)
    assert s.slo_attainment == pytest.approx(met / 4)


def test_a_completion_without_chunks_fails_a_ttft_slo():
    r = rec(0, 0.0, [], 1.0, out=3)
    assert not Slo(ttft_ms=10_000).met_by(r)
    assert Slo(e2e_ms=10_000).met_by(r)


def test_empty_run():
    s = summarize([])
    assert s.requests == 0 and s.duration_s == 0 and s.goodput == 0 and s.ttft == Stat.of([])


def test_summary_keeps_a_message_per_error_kind_and_the_most_common():
    recs = [
        RequestRecord(0, 0.0, 1.0, 4, 2, (0.5, 1.0)),
        RequestRecord(1, 0.0, 0.1, 4, 0, (), "http_400", "The prompt has 2176 tokens"),
        RequestRecord(2, 0.0, 0.1, 4, 0, (), "http_400", "The prompt has 2300 tokens"),
        RequestRecord(3, 0.0, 0.1, 4, 0, (), "timeout"),
    ]
    s = summarize(recs)
    assert s.errors == {"http_400": 2, "timeout": 1}
    assert s.error_messages == {"http_400": "The prompt has 2176 tokens"}
    assert s.top_error == ("http_400", 2, "The prompt has 2176 tokens")
    assert summarize(recs[:1]).top_error is None
