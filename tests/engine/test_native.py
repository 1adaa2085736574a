"""A GGUF in its own precision: the file read lightly, int4 projections from its codes, no dense copy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.gguf_file import GGUFFile
from tests.brokers import need_smollm2


def _smollm2_path():
    need_smollm2()
    from engine.gguf_loader import smollm2_path

    return smollm2_path()


def test_the_light_reader_reads_what_gguf_reads():
    import gguf

    path = _smollm2_path()
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):  # the reader's own header fields
            continue
        value = ours.metadata[key]
        assert (value.tolist() if isinstance(value, np.ndarray) else value) == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, list(a.shape), a.data.dtype) == (b.tensor_type, list(b.shape), b.data.dtype), a.name
        assert np.array_equal(a.data, b.data), a.name


def test_the_light_reader_names_what_is_wrong(tmp_path):
    path = _smollm2_path()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + path.read_bytes()[4:4096])
    with pytest.raises(ValueError, match="magic"):
        GGUFFile(bad)
    bad.write_bytes(path.read_bytes()[:4096])  # the header cut in its metadata
    with pytest.raises(ValueError, match="truncated or malformed"):
        GGUFFile(bad)


@pytest.mark.smollm2
def test_by_default_a_q4_gguf_loads_as_int4_with_no_dense_projection():
    from engine import load_engine
    from engine.quant import Int4Weight

    engine = load_engine("smollm2", device="cpu")
    model = engine.runner.model
    assert model.quant == "int4" and model.compute_dtype == torch.float32
    block = model.model.layers[0]
    assert isinstance(block.self_attn._qkv, Int4Weight) and isinstance(block.mlp.down_proj._packed, Int4Weight)
    projections = [name for name, p in model.named_parameters() if name.endswith("_proj.weight")]
    assert len(projections) == 7 * model.args.num_hidden_layers
    assert all(model.get_parameter(name).is_meta for name in projections)
    dense = sum(p.nbytes for p in model.parameters() if not p.is_meta)
    assert dense < 60e6  # the float16 embedding table and the norms
    assert model.model.embed_tokens.weight.dtype == torch.float16


@pytest.mark.smollm2
def test_a_native_load_peaks_far_below_a_float32_one():
    """Peak RSS of loading the model, above the process's after importing torch, in fresh processes:
    the file's own precision against float32 (the dense path)."""
    code = (
        "import torch, sys\n"
        "def peak():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) * 1024\n"
        "base = peak()\n"
        "from engine import load_engine\n"
        "load_engine('smollm2', device='cpu', num_threads=1, quant=sys.argv[1])\n"
        "print(peak() - base)\n"
    )

    def load_peak(quant: str) -> int:
        out = subprocess.run([sys.executable, "-c", code, quant], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    _smollm2_path()
    native, dense = load_peak("int4"), load_peak("none")
    print(f"load peak above torch: native int4 {native / 1e6:.0f} MB, float32 {dense / 1e6:.0f} MB")
    assert native < 400e6  # model ~180 MB, the tokenizer, one layer's unpacking
    assert native < dense / 2


# ---- small GGUF files of each storage type ---------------------------------------------------------


def _write_llama_gguf(path, projections, *, seed: int = 0) -> None:
    """A 2-layer Llama (hidden 64) in ``path`` with its projections stored as ``projections`` (a
    ggml type), the embedding as Q8_0 and norms as F32; SmolLM2's tokenizer (so the vocabulary is its)."""
    import gguf
    from gguf.quants import quantize

    source = GGUFFile(_smollm2_path()).metadata
    vocab, hidden, heads, kv_heads, ffn, layers = len(source["tokenizer.ggml.tokens"]), 64, 4, 2, 128, 2
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(source["tokenizer.ggml.tokens"])
    writer.add_token_types(source["tokenizer.ggml.token_type"].tolist())
    writer.add_token_merges(source["tokenizer.ggml.merges"])
    writer.add_eos_token_id(int(source["tokenizer.ggml.eos_token_id"]))

    def put(name: str, w: np.ndarray, kind) -> None:
        data = quantize(w, kind) if kind != gguf.GGMLQuantizationType.F32 else w
        writer.add_tensor(
            name, data, raw_shape=data.shape if kind == gguf.GGMLQuantizationType.F32 else None, raw_dtype=kind
        )

    def permuted(w: np.ndarray, n_heads: int) -> np.ndarray:  # llama.cpp's q/k row order
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    f32, q8 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
    put("token_embd.weight", rng.normal(0, 1, (vocab, hidden)).astype(np.float32), q8)
    head_dim = hidden // heads
    for i in range(layers):
        shapes = {
            "attn_q": (heads * head_dim, hidden),
            "attn_k": (kv_heads * head_dim, hidden),
            "attn_v": (kv_heads * head_dim, hidden),
            "attn_output": (hidden, hidden),
            "ffn_gate": (ffn, hidden),
            "ffn_up": (ffn, hidden),
            "ffn_down": (hidden, ffn),
        }
        for part, shape in shapes.items():
            w = rng.normal(0, 1 / np.sqrt(shape[1]), shape).astype(np.float32)
            w = permuted(w, heads) if part == "attn_q" else permuted(w, kv_heads) if part == "attn_k" else w
            put(f"blk.{i}.{part}.weight", w, projections)
        put(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32), f32)
        put(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32), f32)
    put("output_norm.weight", np.ones(hidden, np.float32), f32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.smollm2
@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0", "Q8_0", "F16"])
def test_a_gguf_of_each_type_loads_and_int4_matches_its_float32_load(tmp_path, kind):
    import gguf

    from engine import load_engine

    path = tmp_path / f"tiny-{kind}.gguf"
    _write_llama_gguf(path, gguf.GGMLQuantizationType[kind])
    dense = load_engine(str(path), device="cpu", quant="none")
    default = load_engine(str(path), device="cpu")
    int4 = load_engine(str(path), device="cpu", quant="int4")
    own_precision = kind.startswith("Q4")
    assert getattr(default.runner.model, "quant", None) == ("int4" if own_precision else None)
    assert int4.runner.model.quant == "int4"
    assert all(p.is_meta for n, p in int4.runner.model.named_parameters() if n.endswith("_proj.weight"))
    prompt = dense.tokenizer.encode("The capital of France is")
    ref = teacher_forced(dense, prompt)

    def error(engine) -> float:
        return ((teacher_forced(engine, prompt) - ref).norm() / ref.norm()).item()

    if own_precision:  # the file's own codes, both ways: only the activations' bfloat16 rounding apart
        assert error(default) < 0.02 and error(int4) < 0.02
    else:  # as stored (dense), or quantized again onto int4's 16 levels (random weights: ~10 %)
        assert error(default) == 0.0 and 0.0 < error(int4) < 0.25


def teacher_forced(engine, ids: list[int]) -> torch.Tensor:
    from tests.engine.test_quant import teacher_forced_logits

    return teacher_forced_logits(engine, ids)
