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
    code = ("import torch, sys\n"
            "def peak():\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) * 1024\n"
            "base = peak()\n"
            "from engine import load_engine\n"
            "load_engine('smollm2', device='cpu', num_threads=1, quant=sys.argv[1])\n"
            "print(peak() - base)\n")

    def load_peak(quant: str) -> int:
        out = subprocess.run([sys.executable, "-c", code, quant], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    _smollm2_path()
    native, dense = load_peak("int4"), load_peak("none")
    print(f"load peak above torch: native int4 {native / 1e6:.0f} MB, float32 {dense / 1e6:.0f} MB")
    assert native < 400e6  # model ~180 MB, the tokenizer, one layer's unpacking
    assert native < dense / 2
