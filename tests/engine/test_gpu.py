"""CUDA paths (skipped without a GPU; scripts/gpu_check.py runs the full oracle and benchmark)."""

from __future__ import annotations

import pytest
import torch

from engine.api import KVHandoff
from tests.engine.conftest import req, run_to_end

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5"])
def test_cuda_float32_matches_cpu_and_hands_off_to_cpu(models_dir, name):
    from engine import load_engine

    cpu = load_engine(name, device="cpu", models_dir=models_dir)
    gpu = load_engine(name, device="cuda", dtype="float32", models_dir=models_dir)
    prompt = list(b"same tokens on every device")
    expected = run_to_end(cpu, [req("r", prompt, max_tokens=16, ignore_eos=True)]).tokens["r"]
    assert run_to_end(gpu, [req("r", prompt, max_tokens=16, ignore_eos=True)]).tokens["r"] == expected
    first = gpu.prefill([req("h", prompt, max_tokens=16, ignore_eos=True)])[0].token_id
    cpu.import_request(KVHandoff.from_bytes(gpu.export_request("h").to_bytes()))
    rest = []
    while cpu.running():
        rest += [e.token_id for e in cpu.decode_step()]
    assert [first, *rest] == expected
