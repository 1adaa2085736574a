"""Export -> bytes -> import continues a request to exactly the tokens it would have produced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.api import KVHandoff
from tests.engine.conftest import Collector, req, run_to_end

CASES = {
    "greedy": dict(max_tokens=24, ignore_eos=True),
    "sampled": dict(max_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=7, ignore_eos=True),
    "unseeded": dict(max_tokens=24, temperature=0.8, ignore_eos=True),
}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_import_continues_identically(make_engine, name, case):
    prompt = list(b"Hand me over, please: ")
    source, target = make_engine(name), make_engine(name)
    expected = run_to_end(source, [req("r", prompt, **CASES[case])]).tokens["r"]

    got = Collector()
    got.add(
        source.prefill([req("other", b"a neighbour", max_tokens=40, ignore_eos=True), req("r", prompt, **CASES[case])])
    )
    for _ in range(6):
        got.add(source.decode_step())
    wire = source.export_request("r").to_bytes()
    assert source.running() == ["other"]

    target.prefill([req("resident", b"already decoding here", max_tokens=40, ignore_eos=True)])
    target.decode_step()
    target.import_request(KVHandoff.from_bytes(wire))
    assert target.running() == ["resident", "r"]
    while "r" in target.running():
        got.add([e for e in target.decode_step() if e.request_id == "r"])
    assert got.tokens["r"] == expected
    assert got.reason["r"] == "length"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5"])
def test_export_into_a_given_buffer_continues_identically(make_engine, name):
    """A transport's buffer (registered memory) receives the KV cache and is handed off as it is."""
    prompt = list(b"Into the buffer: ")
    source, target = make_engine(name), make_engine(name)
    expected = run_to_end(source, [req("r", prompt, **CASES["greedy"])]).tokens["r"]
    got = Collector()
    got.add(source.prefill([req("r", prompt, **CASES["greedy"])]))
    got.add(source.decode_step())
    given = []
    h = source.export_request("r", lambda nbytes: given.append(np.zeros(nbytes, dtype=np.uint8)) or given[-1])
    assert len(given) == 1 and h.kv is given[0] and given[0].any()
    target.import_request(h)
    while "r" in target.running():
        got.add(target.decode_step())
    assert got.tokens["r"] == expected


def test_export_without_a_buffer_given_gives_bytes(make_engine):
    engine = make_engine()
    engine.prefill([req("r", b"no room", max_tokens=10, ignore_eos=True)])
    h = engine.export_request("r", lambda nbytes: None)  # a transport with no room
    assert isinstance(h.kv, bytes) and len(h.kv) == engine.kv_bytes_per_token * len(b"no room")


def test_handoff_carries_metadata(make_engine):
    engine = make_engine()
    engine.prefill([req("r", b"metadata", max_tokens=10, ignore_eos=True)])
    engine.decode_step()
    h = KVHandoff.from_bytes(engine.export_request("r").to_bytes())
    layers, kv_heads, head_dim = engine.runner.cache.geometry
    assert h.layout == "llama:L,2,Hkv,T,D"
    assert h.shape == (layers, 2, kv_heads, len(b"metadata") + 1, head_dim)
    assert h.dtype == "float32"
    assert len(h.kv) == 4 * layers * 2 * kv_heads * (len(b"metadata") + 1) * head_dim
    assert len(h.kv) == engine.kv_bytes_per_token * (len(b"metadata") + 1)
    assert h.prompt_ids == tuple(b"metadata") and len(h.generated_ids) == 2


def test_import_rejects_foreign_or_duplicate(make_engine):
    engine = make_engine()
    engine.prefill([req("r", b"dup", max_tokens=10, ignore_eos=True)])
    h = engine.export_request("r")
    engine.import_request(h)
    with pytest.raises(ValueError, match="already running"):
        engine.import_request(h)
    foreign = KVHandoff(**{**h.__dict__, "model": "tiny-opt", "layout": "gpt:L,2,Hkv,T,D"})
    with pytest.raises(ValueError):
        make_engine().import_request(foreign)
    with pytest.raises(ValueError):
        KVHandoff.from_bytes(b"\x93garbage")
    engine.abort("r")
    for bad in (
        {"kv": h.kv[:-4]},
        {"rng_state": b"\x00" * 7},
        {"generated_ids": h.generated_ids * 2},
        {"dtype": "complex32x"},
    ):
        with pytest.raises(ValueError):
            engine.import_request(KVHandoff(**{**h.__dict__, **bad}))
        assert engine.running() == [] and engine.runner.cache.size == 0
    with pytest.raises(KeyError):
        engine.export_request("unknown")


def test_t5_handoff_holds_self_and_cross_cache(make_engine):
    engine = make_engine("tiny-t5")
    engine.prefill([req("r", b"encode me", max_tokens=10, ignore_eos=True)])
    engine.decode_step()
    h = engine.export_request("r")
    layers, heads, head_dim = engine.runner.self_cache.geometry
    assert h.layout.startswith("t5:self+cross")
    assert h.shape == (layers, 2, heads, len(h.generated_ids) + len(b"encode me"), head_dim)


def test_bfloat16_handoff_between_engines(make_engine):
    source, target = make_engine(dtype="bfloat16"), make_engine(dtype="bfloat16")
    params = dict(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True)
    expected = run_to_end(source, [req("r", b"bf16 cache", **params)]).tokens["r"]
    got = Collector()
    got.add(source.prefill([req("r", b"bf16 cache", **params)]))
    got.add(source.decode_step())
    h = KVHandoff.from_bytes(source.export_request("r").to_bytes())
    assert h.dtype == "bfloat16" and len(h.kv) == 2 * torch.Size(h.shape).numel()
    target.import_request(h)
    while target.running():
        got.add(target.decode_step())
    assert got.tokens["r"] == expected
