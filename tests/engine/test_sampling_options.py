"""Log-probabilities and presence/frequency penalties."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch

from engine.api import GenerationRequest, KVHandoff, SamplingParams
from engine.sampling import hold_back_stops, logprobs_of, penalise


def req(rid: str, n: int = 8, **params) -> GenerationRequest:
    return GenerationRequest(rid, (5, 9, 13, 2, 7), SamplingParams(max_tokens=n, ignore_eos=True, **params))


def run(engine, *requests) -> dict[str, list]:
    events: dict[str, list] = {r.request_id: [] for r in requests}
    for e in engine.step(prefill=list(requests)):
        events[e.request_id].append(e)
    while engine.running():
        for e in engine.decode_step():
            events[e.request_id].append(e)
    return events


def test_penalise_follows_openais_definition() -> None:
    logits = torch.zeros(2, 5)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=1.0), SamplingParams()]
    out = penalise(logits, params, [[1, 1, 3], [1, 1, 3]])
    assert out[0].tolist() == [0.0, -2.5, 0.0, -1.5, 0.0]
    assert out[1].tolist() == [0.0] * 5  # a row without penalties is untouched
    assert logits.abs().sum() == 0  # the caller's logits are not modified


def test_negative_penalties_favour_repeats() -> None:
    out = penalise(torch.zeros(1, 3), [SamplingParams(presence_penalty=-1.0)], [[2]])
    assert out[0].tolist() == [0.0, 0.0, 1.0]


def test_logprobs_of_rows() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]])
    params = [SamplingParams(logprobs=2), SamplingParams()]
    (chosen, top), (none, empty) = logprobs_of(logits, params, [2, 0])
    expected = torch.log_softmax(logits[0], -1)
    assert chosen == pytest.approx(float(expected[2]))
    assert [t for t, _ in top] == [1, 2] and top[0][1] == pytest.approx(float(expected[1]))
    assert none is None and empty == ()


def test_greedy_tokens_are_their_own_top_logprob(llama) -> None:
    events = run(llama, req("a", logprobs=3), req("b"))
    for e in events["a"]:
        assert e.logprob is not None and e.logprob <= 0
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0] == (e.token_id, pytest.approx(e.logprob))
        values = [lp for _, lp in e.top_logprobs]
        assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-6
    assert all(e.logprob is None and e.top_logprobs == () for e in events["b"])


def test_logprobs_zero_gives_the_chosen_token_only(llama) -> None:
    events = run(llama, req("a", n=3, logprobs=0))
    assert all(e.logprob is not None and e.top_logprobs == () for e in events["a"])


def test_a_penalised_neighbour_changes_nothing_for_the_others(llama) -> None:
    alone = [e.token_id for e in run(llama, req("x", n=12))["x"]]
    together = run(llama, req("x", n=12), req("p", n=12, frequency_penalty=2.0, presence_penalty=2.0))
    assert [e.token_id for e in together["x"]] == alone


def test_penalties_reduce_repetition(llama) -> None:
    plain = [e.token_id for e in run(llama, req("x", n=24))["x"]]
    penalised = [e.token_id for e in run(llama, req("y", n=24, frequency_penalty=2.0, presence_penalty=2.0))["y"]]
    assert len(set(penalised)) >= len(set(plain))
    assert penalised != plain or len(set(plain)) == len(plain)


@pytest.mark.parametrize(
    "bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(logprobs=21), dict(logprobs=-1)]
)
def test_out_of_range_options_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_the_hand_off_carries_the_new_options_and_reads_older_ones(llama) -> None:
    llama.step(prefill=[req("h", n=8, logprobs=2, frequency_penalty=0.5)])
    handoff = llama.export_request("h")
    again = KVHandoff.from_bytes(handoff.to_bytes())
    assert again.params == handoff.params and again.params.logprobs == 2
    old = msgpack.unpackb(handoff.to_bytes(), raw=False)
    for key in ("presence_penalty", "frequency_penalty", "logprobs"):
        del old["params"][key]  # as a sender without these options writes it
    older = KVHandoff.from_bytes(msgpack.packb(old, use_bin_type=True))
    assert older.params.logprobs is None and older.params.frequency_penalty == 0.0


def test_min_tokens_hold_back_end_of_sequence() -> None:
    logits = torch.zeros(2, 4)
    params = [SamplingParams(min_tokens=3), SamplingParams(min_tokens=3)]
    out = hold_back_stops(logits, params, [[1, 2], [1, 2, 3]], frozenset({0, 2}))
    assert out[0].tolist() == [float("-inf"), 0.0, float("-inf"), 0.0]  # 2 generated < 3: no EOS yet
    assert out[1].tolist() == [0.0] * 4  # 3 reached
    assert logits.abs().sum() == 0


def test_min_tokens_through_the_engine(llama) -> None:
    """The likeliest token made an end-of-sequence: without min_tokens the request stops at once;
    with it, it goes on to min_tokens."""
    first = run(llama, req("probe", n=1))["probe"][0].token_id
    llama.stop_token_ids = llama.stop_token_ids | {first}
    try:
        plain = GenerationRequest("p", (5, 9, 13, 2, 7), SamplingParams(max_tokens=8))
        held = GenerationRequest("m", (5, 9, 13, 2, 7), SamplingParams(max_tokens=8, min_tokens=4))
        events = run(llama, plain, held)
    finally:
        llama.stop_token_ids = llama.stop_token_ids - {first}
    assert len(events["p"]) == 1 and events["p"][0].finish_reason == "stop"
    assert len(events["m"]) >= 4 and all(e.token_id != first for e in events["m"][:4])
