"""Static-shape decode steps (engine.cuda_graph): the same tokens and logits as the normal decode
path. On the CPU the static forward runs without capture; the CUDA tests capture and replay."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.cuda_graph import BUCKETS, DecodeGraphs, attach, bucket_for, detach, span_for
from tests.engine.conftest import req

REPO_ROOT = Path(__file__).resolve().parents[2]
LOGIT_TOL = 1e-3  # float32, tiny models (logits of magnitude ~30): only summation order differs

SPEC = {  # prompt, max_tokens
    "a": (b"Once upon a time", 70),  # long enough that the cache's capacity grows mid-run
    "b": (b"hi", 7),
    "c": (b"The quick brown fox jumps over the lazy dog.", 24),
    "d": (b"x", 30),
    "e": (b"0123456789abcdef", 5),
}


def _req(rid: str):
    prompt, n = SPEC[rid]
    return req(rid, list(prompt), max_tokens=n, ignore_eos=True)


def run_schedule(engine) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
    """Requests of different lengths join and leave over 70+ steps; a mixed step, a subset decode and
    a padded step on the way. Returns each request's tokens and every forward pass's logits."""
    runner = engine.runner
    logits: list[torch.Tensor] = []
    step = runner.step

    def recording(*args):
        rows = step(*args)
        logits.append(rows.clone())
        return rows

    out: dict[str, list[int]] = {rid: [] for rid in SPEC}

    def add(events) -> None:
        for e in events:
            out[e.request_id].append(e.token_id)

    runner.step = recording
    try:
        add(engine.prefill([_req("a"), _req("b")]))
        for _ in range(3):
            add(engine.decode_step())
        add(engine.step(prefill=[_req("c")], decode=engine.running()))  # mixed: the normal path
        for _ in range(5):
            add(engine.decode_step())  # b leaves after 7 tokens: c moves into its slot
        add(engine.step(decode=engine.running()[-1:]))  # a subset: the normal path
        add(engine.step(decode=engine.running(), padding=3))  # 2 live + 3 padding rows: bucket 8
        add(engine.prefill([_req("d"), _req("e")]))  # d lands in a slot a padding row wrote
        while engine.running():
            add(engine.decode_step())
    finally:
        del runner.step
    return out, logits


def test_buckets_and_spans():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 9, 200, 256)] == [1, 2, 4, 4, 8, 16, 256, 256]
    assert bucket_for(257) is None and BUCKETS[-1] == 256
    assert [span_for(n, 10_000) for n in (1, 64, 65, 97, 129, 200, 257, 513, 1000)] == [
        64,
        64,
        96,
        128,
        192,
        256,
        384,
        768,
        1024,
    ]
    assert span_for(600, 640) == 640 and span_for(10, 40) == 40  # never past the capacity


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_static_path_matches_normal_path(make_engine, name):
    normal = make_engine(name)
    static = make_engine(name)
    graphs = attach(static.runner, capture=False)
    expected, expected_logits = run_schedule(normal)
    tokens, logits = run_schedule(static)

    assert tokens == expected
    assert {rid: len(t) for rid, t in tokens.items()} == {rid: n for rid, (_, n) in SPEC.items()}
    assert len(set(map(tuple, expected.values()))) == len(SPEC)  # the model is not degenerate
    assert len(logits) == len(expected_logits)
    for ours, ref in zip(logits, expected_logits):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < LOGIT_TOL
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    counts = graphs.counts
    assert counts["static"] >= 60  # every whole-batch decode step
    assert counts["fallbacks"] == 1  # the subset decode
    assert counts["resets"] >= 1  # the cache grew (slots for bucket 8, positions for a's 86)
    assert static.runner.cache.size == 0


def test_static_step_pads_to_the_bucket_and_writes_no_live_slot(make_engine):
    engine = make_engine("tiny-llama")
    runner = engine.runner
    graphs = attach(runner, capture=False)
    prompts = [list(b"one"), list(b"second prompt"), list(b"3")]
    with torch.inference_mode():
        first = runner.prefill(prompts).argmax(-1).tolist()
        cache = runner.cache
        before = cache.kv[:, :, :3].clone()
        lengths = list(cache.lengths)
        logits = graphs.step(first, padding=2)  # 3 live + 2 padding rows: bucket 8
        assert logits.shape == (3, engine.vocab_size)
        assert list(graphs._statics) == [(8, span_for(max(lengths) + 1, cache.kv.shape[4]))]
        assert cache.kv.shape[2] >= 8  # the bucket's slots exist
        after = cache.kv[:, :, :3]
        for slot, n in enumerate(lengths):  # the live slots changed only at their new position
            assert torch.equal(after[:, :, slot, :, :n], before[:, :, slot, :, :n])
            assert not torch.equal(after[:, :, slot, :, n], before[:, :, slot, :, n])
        assert cache.lengths == lengths  # the caller advances, as after a normal step
        cache.advance()
        for slot in reversed(range(3)):
            runner.remove(slot)


def test_falls_back_where_shapes_are_not_static(make_engine):
    engine = make_engine("tiny-llama")
    runner = engine.runner
    graphs = attach(runner, capture=False)
    with torch.inference_mode():
        runner.prefill([list(b"ab"), list(b"cde")])
        assert graphs.step([1]) is None  # a subset of the running batch
        assert graphs.step([]) is None
        assert graphs.step([1, 2], padding=BUCKETS[-1]) is None  # more rows than the largest bucket
        assert graphs.counts["fallbacks"] == 3 and graphs.counts["static"] == 0
        assert graphs.step([1, 2]) is not None
        runner.cache.advance()
    detach(runner)
    assert runner.decode_graphs is None


def test_cuda_graphs_option_is_ignored_off_cuda(make_engine):
    engine = make_engine("tiny-llama", cuda_graphs=True)
    assert engine.runner.decode_graphs is None
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(engine.runner.model, engine.runner.cache, capture=True)


def test_random_llama_shapes_have_the_real_models_parameter_counts():
    from engine.tiny import random_llama_config, random_llama_parameters

    assert random_llama_parameters("smollm2-135m") == 134_515_008  # SmolLM2-135M
    assert random_llama_parameters("llama-1b") == 1_235_814_400  # Llama-3.2-1B
    cfg = random_llama_config("smollm2-135m")
    assert (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["vocab_size"],
        cfg["max_position_embeddings"],
        cfg["tie_word_embeddings"],
    ) == (576, 1536, 30, 9, 3, 49152, 8192, True)
    with pytest.raises(ValueError, match="unknown Llama shape"):
        random_llama_config("llama-7b")


def test_write_random_llama_writes_a_loadable_folder_once(tmp_path):
    from safetensors import safe_open

    from engine import load_engine
    from engine.tiny import random_llama_parameters, write_random_llama

    shape = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    folder = write_random_llama(tmp_path / "m", shape)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert sum(t.numel() for t in stored.values()) == random_llama_parameters(shape)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert write_random_llama(tmp_path / "m", shape) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # already there: not rewritten
    engine = load_engine(str(folder), device="cpu")
    assert sum(p.numel() for p in engine.runner.model.parameters()) == random_llama_parameters(shape)
    events = engine.prefill([req("r", list(b"hello"), max_tokens=4, ignore_eos=True)])
    while engine.running():
        events += engine.decode_step()
    assert len(events) == 4


def test_gpu_check_runs_on_the_cpu_without_gguf(tmp_path):
    """``scripts/gpu_check.py --device cpu --quick``: every part with small sizes, no capture, and
    nothing imports the gguf package on the random-weight path."""
    code = (
        "import sys, runpy; sys.modules['gguf'] = None; "
        f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--quick', '--json', {str(tmp_path / 'r.json')!r}, "
        f"'--models-dir', {str(tmp_path / 'models')!r}]; "
        "runpy.run_path('scripts/gpu_check.py', run_name='__main__')"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json

    results = json.loads((tmp_path / "r.json").read_text())
    assert results["pass"] and not results["errors"]
    assert results["oracle"]["fp32_graphs_same"] and results["oracle"]["fp32_graphs_counts"]["static"] > 0
    assert results["decode"][0]["rows"] and all(r["greedy_same"] for r in results["decode"][0]["rows"])
    assert "TP=2 not run" in done.stdout
    assert [b["cuda_graphs"] for b in results["bench"]] == [False, True]
    print(f"gpu_check --device cpu --quick: {time.perf_counter() - started:.1f} s")


def test_gpu_check_default_model_needs_gguf(monkeypatch):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as on a machine without the package
    assert gpu_check.smollm2_available() is False


# ---- CUDA: capture and replay --------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_cuda_graphs_match_eager(models_dir, name):
    from engine import load_engine

    eager = load_engine(name, device="cuda", dtype="float32", models_dir=models_dir)
    graphed = load_engine(name, device="cuda", dtype="float32", models_dir=models_dir, cuda_graphs=True)
    expected, expected_logits = run_schedule(eager)
    tokens, logits = run_schedule(graphed)
    assert tokens == expected
    for ours, ref in zip(logits, expected_logits):
        assert (ours - ref).abs().max().item() < LOGIT_TOL
    graphs = graphed.runner.decode_graphs
    assert graphs.disabled is None
    assert graphs.counts["captures"] >= 2 and graphs.counts["static"] >= 60


@pytest.mark.gpu
@cuda
def test_one_cuda_graph_serves_many_steps(models_dir):
    """Positions and masks come from the cache on the device, so one capture replays for every step
    within its bucket and key span."""
    from engine import load_engine

    def tokens(engine) -> list[tuple[str, int]]:
        events = engine.prefill(
            [req(r, list(p), max_tokens=20, ignore_eos=True) for r, p in (("x", b"abc"), ("y", b"defghij"))]
        )
        while engine.running():
            events += engine.decode_step()
        return [(e.request_id, e.token_id) for e in events]

    graphed = load_engine("tiny-llama", device="cuda", dtype="float32", models_dir=models_dir, cuda_graphs=True)
    eager = load_engine("tiny-llama", device="cuda", dtype="float32", models_dir=models_dir)
    assert tokens(graphed) == tokens(eager)
    counts = graphed.runner.decode_graphs.counts
    assert counts["captures"] == 1 and counts["static"] == 19  # bucket 2, span 64: 19 decode steps
