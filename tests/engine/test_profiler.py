from __future__ import annotations

import pytest

from engine.profiler import Grid, profile_rows, read_jsonl
from services.cli import main


def test_profile_rows_follow_reference_schema(llama):
    grid = Grid(tokens=(1, 8), prefill=((1, 16), (2, 16)), decode=((2, 32),))
    split, layers = profile_rows(llama, "tiny-llama", grid, repeats=2)
    assert [(r["part"], r.get("tokens"), r.get("batch"), r.get("seq"), r.get("ctx")) for r in split] == [
        ("rest", 1, None, None, None), ("rest", 8, None, None, None),
        ("attn_prefill", None, 1, 16, None), ("attn_prefill", None, 2, 16, None),
        ("attn_decode", None, 2, None, 32)]
    assert [(r["phase"], r["batch"], r.get("seq"), r.get("ctx")) for r in layers] == [
        ("prefill", 1, 16, None), ("prefill", 2, 16, None), ("decode", 2, None, 32)]
    assert all(r["model"] == "tiny-llama" and r["tp"] == 1 and r["ms"] >= 0 for r in split + layers)
    assert all(r["ms"] > 0 for r in layers)


def test_profile_rejects_encoder_decoder(make_engine):
    with pytest.raises(ValueError, match="decoder-only"):
        profile_rows(make_engine("tiny-t5"), "tiny-t5", Grid(tokens=(1,), prefill=(), decode=()), repeats=1)


def test_profile_cli_writes_both_files(tmp_path, monkeypatch, models_dir):
    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models_dir))
    out = tmp_path / "p.jsonl"
    assert main(["profile", "--model", "tiny-llama", "--out", str(out), "--repeats", "1", "--quick",
                 "--device", "cpu"]) == 0
    split = list(read_jsonl(out))
    layers = list(read_jsonl(tmp_path / "p-layers.jsonl"))
    assert "device" in split[0] and "device" in layers[0]
    assert {r["part"] for r in split[1:]} == {"rest", "attn_prefill", "attn_decode"}
    assert {r["phase"] for r in layers[1:]} == {"prefill", "decode"}
