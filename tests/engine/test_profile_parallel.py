"""`exegpt profile` at several TP degrees, and the collectives it measures for the cluster's links."""

from __future__ import annotations

import json

import pytest
import torch

from engine.parallel import collectives
from engine.parallel.collectives import fit_alpha_beta, measure
from engine.profiler import load_shard, probe_of, profile_rows, quick_grid, read_jsonl, write_jsonl
from optimizer.cluster import allreduce_s, cluster_to_dict, parse_cluster
from optimizer.io import load_cluster, load_profile
from optimizer.profile import StepShape, smooth_rows
from services.cli import main


def _cell(row: dict) -> tuple:
    return tuple((k, v) for k, v in row.items() if k not in ("tp", "ms"))


def _work(rows: list[dict], tp: int) -> float:
    return sum(r["ms"] for r in rows if r["tp"] == tp and r.get("part") != "step")


def test_tp2_rows_cover_the_tp1_cells_and_cost_less(make_engine, models_dir, tmp_path):
    grid = quick_grid(1024)  # the longest cells make the sums: attention over 1024 positions
    engine = make_engine("tiny-llama")
    for _ in range(3):  # a stall from elsewhere on a shared machine can swamp one cell: measure again
        split, layers = profile_rows(engine, "tiny-llama", grid, repeats=3, tp_degrees=(1, 2), models_dir=models_dir)
        if all(_work(rows, 2) < _work(rows, 1) for rows in (split, layers)):
            break
    for rows in (split, layers):
        by_tp = {tp: [r for r in rows if r["tp"] == tp] for tp in (1, 2)}
        assert [_cell(r) for r in by_tp[2]] == [_cell(r) for r in by_tp[1]]  # same cells, same order
        steps = {tp: [r["ms"] for r in by_tp[tp] if r.get("part") == "step"] for tp in (1, 2)}
        assert steps[2] == steps[1] and steps[1]  # the LM head and sampling are not sharded
        # half the heads and FFN units; summed over the cells, since single cells are noisy
        assert _work(rows, 2) < _work(rows, 1), (_work(rows, 1), _work(rows, 2))

    write_jsonl(tmp_path / "p.jsonl", {"device": "cpu"}, smooth_rows(split).rows)
    write_jsonl(tmp_path / "p-layers.jsonl", {"device": "cpu"}, smooth_rows(layers).rows)
    profile = load_profile(tmp_path / "p.jsonl", tmp_path / "p-layers.jsonl")
    assert profile.tp_degrees("tiny-llama") == [1, 2]
    shape = StepShape(prefill_seqs=2, prefill_tokens=2048, prefill_seq=1024, decode_seqs=2, decode_ctx=1024)
    assert 0 < float(profile.layer_times("tiny-llama", 2).step_s(shape))
    assert profile.step_s("tiny-llama", 2)(2.0) == profile.step_s("tiny-llama", 1)(2.0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5"])
def test_a_shard_is_probed_with_its_own_heads(models_dir, name):
    shard = load_shard(name, 2, dtype=torch.float32, device=torch.device("cpu"), models_dir=models_dir)
    probe = probe_of(shard, torch.device("cpu"))
    _, full_kv, _ = shard.cache_geometry()  # still the whole model's
    assert probe.kv_heads == shard.local_kv_heads == full_kv // 2
    assert probe.heads == 2  # of the tiny models' 4
    with torch.inference_mode():  # every kind of cell runs on the shard's caches
        for fn in (
            probe.prefill_layer(2, 16),
            probe.decode_layer(2, 16, 16),
            probe.attn_prefill(2, 16),
            probe.attn_decode(2, 16),
            *probe.attention_in_decode(2),
        ):
            fn()


def test_fit_alpha_beta_recovers_a_line_and_stays_physical():
    sizes = [1024 * 4**i for i in range(6)]
    fit = fit_alpha_beta(sizes, [50e-6 + n / 2e9 for n in sizes])
    assert fit.latency_s == pytest.approx(50e-6) and fit.bandwidth_Bps == pytest.approx(2e9)
    assert fit_alpha_beta(sizes, [n / 1e9 - 1e-6 for n in sizes]).latency_s == 0  # never negative
    flat = fit_alpha_beta(sizes, [2e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4])  # no growth with size (noise)
    assert flat.latency_s == pytest.approx(1e-4, rel=0.3)
    assert flat.bandwidth_Bps == pytest.approx(sizes[-1] / flat.latency_s)
    with pytest.raises(ValueError, match="two message sizes"):
        fit_alpha_beta([1024], [1e-4])


@pytest.mark.slow
def test_quick_measurement_between_two_processes():
    times = measure(sizes=(1024, 16384, 262144), repeats=5, budget_s=1.0)
    assert [s.nbytes for s in times.sizes] == [1024, 16384, 262144]
    assert all(s.allreduce_s > 0 and s.p2p_s > 0 and s.samples >= 3 for s in times.sizes)
    for fit in (times.allreduce_fit(), times.p2p_fit()):
        assert fit.bandwidth_Bps > 0 and fit.latency_s >= 0
    assert times.wall_s < 15
    assert not torch.distributed.is_initialized()  # this process left the group


@pytest.mark.slow
def test_profile_cli_at_tp_2_writes_tp_rows_and_the_measured_link(tmp_path, monkeypatch, models_dir, capsys):
    real = measure
    monkeypatch.setattr(collectives, "measure", lambda: real(sizes=(1024, 65536, 1 << 20), repeats=5, budget_s=1.0))
    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models_dir))
    out = tmp_path / "p.jsonl"
    assert (
        main(
            [
                "profile",
                "--model",
                "tiny-llama",
                "--out",
                str(out),
                "--repeats",
                "1",
                "--quick",
                "--device",
                "cpu",
                "--max-len",
                "256",
                "--threads",
                "1",
                "--tp-degrees",
                "2",
            ]
        )
        == 0
    )  # 1 is added
    printed = capsys.readouterr().out
    assert "all-reduce" in printed and "1 MiB" in printed and "tp 1,2" in printed
    assert next(read_jsonl(out))["tp_degrees"] == [1, 2]
    profile = load_profile(out, tmp_path / "p-layers.jsonl")
    assert profile.tp_degrees("tiny-llama") == [1, 2] and profile.warnings == ()
    cluster = load_cluster(tmp_path / "p-cluster.json")
    link = cluster.intra_node
    assert link.latency_s > 0 and link.bandwidth_Bps > 0 and link.source.startswith("measured by exegpt profile")
    assert cluster.inter_node == link
    assert parse_cluster(json.loads(json.dumps(cluster_to_dict(cluster)))) == cluster
    assert allreduce_s(link, 65536, 2) > 0


def test_quick_profile_keeps_the_default_link_unless_asked(tmp_path, monkeypatch, models_dir):
    monkeypatch.setattr(collectives, "measure", lambda: pytest.fail("measured without being asked"))
    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models_dir))
    out = tmp_path / "p.jsonl"
    assert (
        main(
            [
                "profile",
                "--model",
                "tiny-llama",
                "--out",
                str(out),
                "--repeats",
                "1",
                "--quick",
                "--device",
                "cpu",
                "--max-len",
                "64",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert load_cluster(tmp_path / "p-cluster.json").intra_node.source.startswith("default, not measured")
    assert (
        main(
            [
                "profile",
                "--model",
                "tiny-llama",
                "--out",
                str(out),
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--max-batch",
                "2",
                "--max-len",
                "32",
                "--max-tokens",
                "64",
                "--threads",
                "1",
                "--no-collectives",
            ]
        )
        == 0
    )


def test_a_degree_the_model_cannot_take_is_a_one_line_error(tmp_path, capsys, monkeypatch, models_dir):
    monkeypatch.setattr(collectives, "measure", lambda: pytest.fail("measured before the rows"))
    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models_dir))
    assert (
        main(
            [
                "profile",
                "--model",
                "tiny-llama",
                "--out",
                str(tmp_path / "p.jsonl"),
                "--quick",
                "--device",
                "cpu",
                "--repeats",
                "1",
                "--max-len",
                "64",
                "--tp-degrees",
                "1,4",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "2 key/value heads cannot be split over 4" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tp-degrees", "0"], "degrees must be >= 1"),
        (["--tp-degrees", "two"], "not a list of integers"),
        (["--measure-links", "--no-collectives"], "not allowed with argument"),
    ],
)
def test_bad_tp_and_link_flags_are_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["profile", "--out", str(tmp_path / "p.jsonl"), "--quick", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_profile_writes_the_measured_nixl_link_as_the_clusters_handoff(tmp_path, monkeypatch, models_dir, capsys):
    """With broker URLs the hand-off link is the NIXL path's (measured by services.bench.handoff;
    stubbed here: the measurement itself is tested in test_profile_handoff)."""
    from services.bench import handoff

    monkeypatch.setattr(collectives, "measure", lambda: pytest.fail("collectives measured without being asked"))
    asked = []

    def measured(amqp_url, redis_url):
        asked.append((amqp_url, redis_url))
        return "nixl", 1.5e9, 3e-4, "measured: NIXL read between two worker processes (stub)"

    monkeypatch.setattr(handoff, "nixl_link", measured)
    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models_dir))
    out = tmp_path / "p.jsonl"
    assert (
        main(
            [
                "profile",
                "--model",
                "tiny-llama",
                "--out",
                str(out),
                "--repeats",
                "1",
                "--quick",
                "--device",
                "cpu",
                "--max-len",
                "64",
                "--threads",
                "1",
                "--amqp-url",
                "amqp://a",
                "--redis-url",
                "redis://r",
            ]
        )
        == 0
    )
    link = load_cluster(tmp_path / "p-cluster.json").handoff
    assert asked == [("amqp://a", "redis://r")]
    assert (link.name, link.bandwidth_Bps, link.latency_s) == ("nixl", 1.5e9, 3e-4)
