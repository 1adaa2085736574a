"""Chunked prefill (``Engine.step(chunks=...)``): a prompt prefilled a chunk per step, beside the
decode rows of running requests, gives the tokens (and nearly the logits) of a whole prefill."""

from __future__ import annotations

import pytest
import torch

from engine.api import PromptChunk
from tests.engine.conftest import Collector, req


def _chunked(engine, request, size: int, beside=None) -> Collector:
    """Prefill ``request`` in chunks of ``size`` (one a step, ``beside`` decoding in the same steps
    while it runs), then decode it to its end."""
    out = Collector()
    total = len(request.prompt_ids) + len(request.resume_ids)
    for start in range(0, total, size):
        decode = [rid for rid in engine.running() if beside is not None]
        events = engine.step(decode=decode, chunks=[PromptChunk(request, start, min(size, total - start))])
        mine = [e for e in events if e.request_id == request.request_id]
        assert bool(mine) == (start + size >= total)  # only the last chunk gives a token
        if beside is not None:
            beside.add([e for e in events if e.request_id != request.request_id])
        out.add(mine)
    while request.request_id in engine.running():
        events = engine.decode_step()
        out.add([e for e in events if e.request_id == request.request_id])
        if beside is not None:
            beside.add([e for e in events if e.request_id != request.request_id])
    return out


def _whole(engine, request) -> list[int]:
    out = Collector()
    out.add(engine.prefill([request]))
    while engine.running():
        out.add(engine.decode_step())
    return out.tokens[request.request_id]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("size", [1, 3, 7, 40])
def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(make_engine, name, size):
    engine = make_engine(name)
    request = req("a", [(7 * i + 3) % 200 for i in range(23)], max_tokens=8, ignore_eos=True)
    want = _whole(engine, request)
    assert _chunked(engine, request, size).tokens["a"] == want
    assert engine.running() == []


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_chunks_fold_into_decode_steps_without_changing_anyone(make_engine, name):
    engine = make_engine(name)
    others = [
        req(f"o{i}", [(11 * i + j) % 200 for j in range(5 + 3 * i)], max_tokens=12, ignore_eos=True) for i in range(3)
    ]
    request = req("a", [(5 * i + 1) % 200 for i in range(19)], max_tokens=6, ignore_eos=True)
    want = {r.request_id: _whole(engine, r) for r in (*others, request)}
    beside = Collector()
    beside.add(engine.prefill(others))
    got = _chunked(engine, request, 4, beside)
    while engine.running():
        beside.add(engine.decode_step())
    assert got.tokens["a"] == want["a"]
    assert {r.request_id: beside.tokens[r.request_id] for r in others} == {k: want[k] for k in beside.tokens}


def test_chunked_logits_are_close_to_a_whole_prefill(make_engine):
    engine = make_engine("tiny-llama")
    prompt = [(13 * i + 2) % 200 for i in range(17)]
    whole = engine.runner.prefill([prompt])[0]
    engine.runner.remove(0)
    engine.runner.prefill([prompt[:6]])
    engine.runner.step([], [], [], 0, chunks=[(0, prompt[6:11])])
    last = engine.runner.step([], [], [], 0, chunks=[(0, prompt[11:])])[0]
    engine.runner.remove(0)
    assert torch.allclose(whole, last, atol=1e-4, rtol=1e-4)


def test_a_request_being_prefilled_is_not_running_and_chunks_must_follow_each_other(make_engine):
    engine = make_engine("tiny-llama")
    request = req("a", list(range(1, 11)), max_tokens=3)
    engine.step(chunks=[PromptChunk(request, 0, 4)])
    assert engine.running() == []
    with pytest.raises(ValueError, match="not running"):
        engine.step(decode=["a"])
    with pytest.raises(ValueError, match="continue"):
        engine.step(chunks=[PromptChunk(request, 5, 2)])
    with pytest.raises(ValueError, match="still being prefilled"):
        engine.export_request("a")
    with pytest.raises(ValueError, match="outside"):
        engine.step(chunks=[PromptChunk(request, 4, 7)])
    engine.step(chunks=[PromptChunk(request, 4, 6)])
    assert engine.running() == ["a"]
    engine.abort("a")


def test_t5_refuses_chunks(make_engine):
    engine = make_engine("tiny-t5")
    with pytest.raises(ValueError, match="chunks"):
        engine.step(chunks=[PromptChunk(req("a", [1, 2, 3]), 0, 2)])


def test_smollm2_chunked_prefill_matches_a_whole_prefill(smollm2):
    request = req("s", smollm2.tokenizer.encode("The capital of France is a city that"), max_tokens=6, ignore_eos=True)
    want = _whole(smollm2, request)
    assert _chunked(smollm2, request, 3).tokens["s"] == want
    assert smollm2.running() == []
