"""The benchmark's plumbing on a tiny model (its numbers are not asserted: it is not a timed test)."""

from __future__ import annotations

import torch

from engine.bench import _hf, _ours, format_table, make_prompts, reference_model, spread_lengths


def test_bench_cells_and_table(models_dir, monkeypatch, capsys):
    from services.cli import main

    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models_dir))
    assert (
        main(
            [
                "bench",
                "engine",
                "--model",
                "tiny-llama",
                "--batch-sizes",
                "1,3",
                "--prompt-len",
                "6",
                "--new-tokens",
                "4",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.strip()[:1].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("1", "prefill"), ("1", "decode"), ("3", "prefill"), ("3", "decode")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_reference_generates_what_we_generate(llama):
    """Same weights, forced lengths: HF's padded static batch and our engine agree on the tokens."""
    gen = torch.Generator().manual_seed(1)
    prompts = make_prompts(gen, 3, 6, llama.vocab_size)
    hf = reference_model(llama, "tiny-llama")
    from tests.engine.conftest import req, run_to_end

    ours = run_to_end(llama, [req(f"r{i}", p, max_tokens=5, ignore_eos=True) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([p]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert out[0, len(p) :].tolist() == ours.tokens[f"r{i}"]
    lengths = spread_lengths(gen, 200, 10, 0.5)
    assert min(lengths) == 5 and max(lengths) == 15
    prefill_s, decode_s = _ours(llama, prompts, [2, 3, 4])
    assert prefill_s > 0 and decode_s > 0 and not llama.running()
    prefill_s, decode_s = _hf(hf, prompts, [2, 3, 4], "cpu")
    assert prefill_s > 0 and decode_s > 0
    assert "ratio" in format_table([])


def test_bench_mixed_step_rows(models_dir, monkeypatch, capsys):
    from services.cli import main

    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models_dir))
    assert (
        main(
            [
                "bench",
                "engine",
                "--step",
                "--model",
                "tiny-llama",
                "--step-prompts",
                "2",
                "--step-decodes",
                "3",
                "--prompt-len",
                "5",
                "--rounds",
                "2",
                "--device",
                "cpu",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 prompts x 5 tokens + 3 decodes, median of 2 rounds" in out
    rows = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert set(rows) == {"mixed step (one pass)", "decode_step() then prefill()", "separate / mixed"}
    assert float(rows["separate / mixed"].split()[-1].rstrip("x")) > 0


def test_mixed_step_timing_leaves_the_engine_empty(llama):
    from engine.bench import time_mixed_step

    timing = time_mixed_step(llama, 2, 3, 4, rounds=2)
    assert timing.mixed_s > 0 and timing.separate_s >= timing.prefill_s > 0 and timing.ratio > 0
    assert llama.running() == []
