from __future__ import annotations

import json

import pytest

from engine.profiler import Grid, build_grid, geometric, profile_rows, quick_grid, read_jsonl
from optimizer.profile import StepShape, parse_profile
from services.cli import main

TINY = Grid(tokens=(1, 8), prefill=((1, 16), (1, 32), (2, 16), (2, 32)), decode=((1, 16), (1, 32), (2, 16), (2, 32)))


def test_profile_rows_follow_reference_schema(llama):
    grid = Grid(tokens=(1, 8), prefill=((1, 16), (2, 16)), decode=((2, 32),))
    split, layers = profile_rows(llama, "tiny-llama", grid, repeats=2)
    assert [(r["part"], r.get("tokens"), r.get("batch"), r.get("seq"), r.get("ctx")) for r in split] == [
        ("rest", 1, None, None, None),
        ("rest", 8, None, None, None),
        ("attn_prefill", None, 1, 16, None),
        ("attn_prefill", None, 2, 16, None),
        ("attn_decode", None, 2, None, 32),
    ]
    assert [(r["phase"], r["batch"], r.get("seq"), r.get("ctx")) for r in layers] == [
        ("prefill", 1, 16, None),
        ("prefill", 2, 16, None),
        ("decode", 2, None, 32),
    ]
    assert all(r["model"] == "tiny-llama" and r["tp"] == 1 and r["ms"] >= 0 for r in split + layers)
    assert all(r["ms"] > 0 for r in layers)


def test_t5_profile_has_encoder_rows_and_decoder_rows_with_cross_attention(make_engine):
    grid = Grid(tokens=(1, 8), prefill=TINY.prefill, decode=TINY.decode, enc_seqs=(16, 64))
    split, layers = profile_rows(make_engine("tiny-t5"), "tiny-t5", grid, repeats=1)
    assert {r["part"] for r in split} == {"rest", "attn_encode", "attn_decode"}
    assert {r["phase"] for r in layers} == {"encode", "decode"}
    assert {r["enc_seq"] for r in layers if r["phase"] == "decode"} == {16, 64}
    times = parse_profile("\n".join(json.dumps(r) for r in split + layers)).layer_times("tiny-t5", 1)
    assert float(times.step_s(StepShape(decode_seqs=2, decode_ctx=32, enc_seq=32))) > 0


def test_the_grid_spans_what_is_planned_within_its_token_budgets():
    grid = build_grid(max_batch=64, max_len=1000, max_tokens=4096)
    assert geometric(1, 64) == (1, 2, 4, 8, 16, 32, 64) and geometric(16, 1000) == (16, 32, 64, 128, 256, 512, 1000)
    assert grid.tokens == geometric(1, 4096)
    for cells in (grid.prefill, grid.decode, grid.layer_prefill, grid.layer_decode):
        assert max(b for b, _ in cells) == 64 and max(n for _, n in cells) == 1000
        rows: dict[int, int] = {}
        for b, _ in cells:
            rows[b] = rows.get(b, 0) + 1
        assert min(rows.values()) >= 2  # every batch row can be interpolated
    assert max(b * s for b, s in grid.layer_prefill) <= 4096
    assert max(b * s for b, s in grid.prefill) <= 16 * 4096
    assert (64, 1000) not in grid.layer_prefill and (1, 1000) in grid.layer_prefill
    with pytest.raises(ValueError, match="max_batch >= 2"):
        build_grid(max_batch=1)


def test_quick_grid_has_two_points_per_axis_up_to_max_len():
    q = quick_grid(300)
    assert q.tokens == (1, 16) and q.prefill == q.decode == ((1, 16), (1, 300), (2, 16), (2, 300))


def test_profile_cli_writes_profile_layers_and_cluster(tmp_path, monkeypatch, models_dir):
    import optimizer.profile
    from optimizer.io import load_cluster, load_profile

    calls = []
    real = optimizer.profile.smooth_rows
    monkeypatch.setattr(optimizer.profile, "smooth_rows", lambda rows: calls.append(len(rows)) or real(rows))
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
                "--devices",
                "2",
                "--device-memory",
                "4e9",
            ]
        )
        == 0
    )
    split = list(read_jsonl(out))
    layers = list(read_jsonl(tmp_path / "p-layers.jsonl"))
    assert "device" in split[0] and "device" in layers[0] and split[0]["dtype"] == "torch.float32"
    assert {r["part"] for r in split[1:]} == {"rest", "attn_prefill", "attn_decode", "step"}
    assert {r.get("phase", r.get("part")) for r in layers[1:]} == {"prefill", "decode", "step"}
    assert calls == [len(split) - 1, len(layers) - 1]  # the optimizer's noise rule smoothed both before writing
    profile = load_profile(out, tmp_path / "p-layers.jsonl")
    assert profile.warnings == () and profile.coverage("tiny-llama").context == 256
    assert profile.step_s("tiny-llama")(1.0) >= 0  # the engine's per-step work, charged per step
    cluster = load_cluster(tmp_path / "p-cluster.json")
    assert (cluster.device_count, cluster.devices_per_node, cluster.device_memory_bytes) == (2, 2, 4e9)
    assert cluster.device_threads >= 1 and cluster.handoff.source.startswith("default, not measured")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--amqp-url", "amqp://x"], "give both --amqp-url and --redis-url"),
        (["--device-memory", "-1"], "--device-memory must be > 0"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    ],
)
def test_profile_cli_errors_are_one_line(tmp_path, capsys, args, message):
    assert main(["profile", "--out", str(tmp_path / "p.jsonl"), "--quick", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
