"""`exegpt bench handoff` on the real RabbitMQ and Redis: a short run, both transports, its JSON."""

from __future__ import annotations

import json

import pytest

from services.bench.handoff import SMOLLM2_KV_BYTES_PER_TOKEN
from services.cli import main
from tests.brokers import need, nixl_loads, require_broker

pytestmark = pytest.mark.broker


def test_a_short_run_reports_both_transports_and_keeps_kv_out_of_redis_with_nixl(tmp_path, capsys):
    require_broker()
    need(nixl_loads(), "NIXL (nixl-cu12) cannot load")
    out = tmp_path / "handoff.json"
    assert main(["bench", "handoff", "--tokens", "16", "--mib", "1", "--runs", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["transport"], r["bytes"]) for r in rows] == [
        (t, n) for t in ("nixl", "redis") for n in (16 * SMOLLM2_KV_BYTES_PER_TOKEN, 1 << 20)
    ]
    for r in rows:
        assert {
            "transport",
            "bytes",
            "latency_p50_s",
            "latency_p99_s",
            "bandwidth_bytes_s",
            "redis_peak_bytes",
        } <= r.keys()
        assert 0 < r["latency_p50_s"] <= r["latency_p99_s"]
        assert r["bandwidth_bytes_s"] == pytest.approx(r["bytes"] / r["latency_p50_s"])
        assert r["encoder_peak_rss_bytes"] > 0 and r["decoder_peak_rss_bytes"] > 0
        if r["transport"] == "nixl":
            assert r["redis_peak_bytes"] < 16 << 10 and r["copies"] == 3  # descriptors and the agent only
        else:
            assert r["redis_peak_bytes"] >= r["bytes"] and r["copies"] == 8
    printed = capsys.readouterr().out
    assert "the Redis path's bandwidth" in printed and "copies: of the KV bytes end to end" in printed
