"""The KV-cache budget: the cache grows to it at most, and a request that could never fit is
refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from engine.api import GenerationRequest, SamplingParams
from engine.kv_cache import KVBudgetExceeded, KVCache


def request(rid: str, prompt: int, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(rid, tuple(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_the_cache_grows_within_its_budget() -> None:
    cache = KVCache(2, 1, 4, dtype=torch.float32, device=torch.device("cpu"), max_context=4096)
    cache.budget = 1000
    cache.reserve(4, 100)  # doubling would ask for 4 x 164
    _, _, slots, _, positions, _ = cache.kv.shape
    assert slots * positions <= 1000 and slots >= 4 and positions >= 100
    cache.add_slots([100] * 4)
    cache.reserve(8, 120)
    _, _, slots, _, positions, _ = cache.kv.shape
    assert slots * positions <= 1000 and slots >= 8 and positions >= 120
    with pytest.raises(KVBudgetExceeded, match="exceed the KV-cache budget of 1000"):
        cache.reserve(9, 120)


def test_set_kv_budget_counts_bytes(llama) -> None:
    tokens = llama.set_kv_budget(llama.kv_bytes_per_token * 300 + 5)
    assert tokens == llama.kv_budget_tokens == 300


def test_a_request_that_could_never_fit_is_refused(llama) -> None:
    llama.set_kv_budget(llama.kv_bytes_per_token * 64)
    with pytest.raises(ValueError, match="need 70 positions of KV cache; this worker's cache holds 64"):
        llama.step(prefill=[request("big", 10, 60)])
    assert llama.running() == []


def test_a_batch_within_the_budget_runs_and_stays_in_it(llama) -> None:
    llama.set_kv_budget(llama.kv_bytes_per_token * 200)
    llama.step(prefill=[request(f"r{i}", 10, 30) for i in range(5)])  # 5 x 40 = 200
    for _ in range(29):
        llama.decode_step()
    assert llama.kv_allocated_bytes <= 200 * llama.kv_bytes_per_token
