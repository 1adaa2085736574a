"""One scheduling step (``Engine.step``): new prompts, a subset of the running requests and padding
rows in one forward pass; and requests resumed from tokens already delivered."""

from __future__ import annotations

import random

import pytest
import torch

from engine.api import GenerationRequest, KVHandoff, SamplingParams, TokenEvent
from tests.engine.conftest import Collector, req, run_to_end

ARCHS = ["tiny-llama", "tiny-opt", "tiny-t5"]


def make_requests(rnd: random.Random, n: int, prefix: str = "q") -> list[GenerationRequest]:
    """Different prompt and output lengths; every third request sampled (seeded or not)."""
    out = []
    for i in range(n):
        params = dict(max_tokens=rnd.randint(1, 12), ignore_eos=True)
        if i % 3 == 0:
            params.update(temperature=0.9, top_k=rnd.choice([0, 30]), seed=i if i % 2 else None)
        out.append(req(f"{prefix}{i}", [rnd.randrange(256) for _ in range(rnd.randint(1, 24))], **params))
    return out


def snapshot(engine, rid: str) -> tuple:
    """A running request's whole state: its KV cache, tokens, sampler state and released text."""
    slot = engine.running().index(rid)
    state = engine._slots[slot]
    return engine.runner.export(slot), tuple(state.generated), state.gen.get_state(), state.text.emitted


def assert_same_state(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2]) and a[3] == b[3]


def all_events(engine, requests: list[GenerationRequest]) -> list[TokenEvent]:
    events = engine.prefill(requests)
    while engine.running():
        events += engine.decode_step()
    return events


def drain(engine) -> dict[str, list[int]]:
    """Decode every running request to its end: the tokens each produced from now on."""
    tokens: dict[str, list[int]] = {}
    while engine.running():
        for e in engine.decode_step():
            tokens.setdefault(e.request_id, []).append(e.token_id)
    return tokens


def count_passes(monkeypatch, engine) -> list:
    """Record the Batch of every decoder forward pass the engine makes."""
    model = engine.runner.model
    name = "decode" if model.kind == "t5" else "forward"
    original = getattr(model, name)
    batches: list = []

    def spy(batch, *rest):
        batches.append(batch)
        return original(batch, *rest)

    monkeypatch.setattr(model, name, spy)
    return batches


@pytest.mark.parametrize("name", ARCHS)
def test_random_steps_match_solo_runs_and_leave_others_untouched(make_engine, name):
    """Seeded random plans (prefills, subsets, padding): each request decodes as it would alone, and
    a running request a step does not name keeps its exact state."""
    rnd = random.Random(3)
    engine = make_engine(name)
    requests = make_requests(rnd, 14)
    solo = {r.request_id: run_to_end(engine, [r]) for r in requests}
    out, pending = Collector(), list(requests)
    while pending or engine.running():
        take = pending[: rnd.choice([0, 0, 1, 3])]
        pending = pending[len(take) :]
        running = engine.running()
        decode = rnd.sample(running, rnd.randint(0, len(running)))
        waiting = {rid: snapshot(engine, rid) for rid in running if rid not in decode}
        events = engine.step(prefill=take, decode=decode, padding=rnd.choice([0, 0, 2, 7]))
        assert sorted(e.request_id for e in events) == sorted([*decode, *(r.request_id for r in take)])
        for rid, before in waiting.items():
            assert_same_state(snapshot(engine, rid), before)
        out.add(events)
    for rid, alone in solo.items():
        assert (out.tokens[rid], out.text[rid], out.reason[rid]) == (
            alone.tokens[rid],
            alone.text[rid],
            alone.reason[rid],
        ), rid


@pytest.mark.parametrize("name", ARCHS)
def test_mixed_step_is_one_pass_equal_to_prefill_then_decode(make_engine, monkeypatch, name):
    rnd = random.Random(5)
    old, new = make_requests(rnd, 4, "old"), make_requests(rnd, 3, "new")
    old = [GenerationRequest(r.request_id, r.prompt_ids, SamplingParams(max_tokens=30, ignore_eos=True)) for r in old]
    separate, mixed = make_engine(name), make_engine(name)
    for engine in (separate, mixed):
        engine.prefill(old)
        engine.step(decode=["old1", "old3"])
    decode = ["old0", "old3", "old2"]
    expected = separate.prefill(new) + separate.step(decode=decode)
    passes = count_passes(monkeypatch, mixed)
    got = mixed.step(prefill=new, decode=decode)
    assert len(passes) == 1  # T5: the encoder pass, then this one decoder pass
    if name != "tiny-t5":  # the prompt tokens and the decode rows went through the layers together
        assert passes[0].input_ids.shape[0] == len(decode) + sum(len(r.prompt_ids) for r in new)
    key = lambda e: e.request_id  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)
    monkeypatch.undo()
    assert drain(separate) == drain(mixed)


@pytest.mark.parametrize("name", ARCHS)
def test_padding_costs_decode_rows_and_changes_nothing(make_engine, monkeypatch, name):
    prompts = [b"a long prompt, the longest one here", b"short", b"middle length"]
    plain, padded = make_engine(name), make_engine(name)
    for engine in (plain, padded):
        engine.prefill([req(f"r{i}", p, max_tokens=20, ignore_eos=True) for i, p in enumerate(prompts)])
        engine.step(decode=["r0"])
    waiting = snapshot(padded, "r2")
    passes = count_passes(monkeypatch, padded)
    cache = padded.runner.cache if name != "tiny-t5" else padded.runner.self_cache
    longest = max(cache.lengths[padded.running().index(r)] for r in ("r0", "r1"))
    got = padded.step(decode=["r1", "r0"], padding=40)  # more rows than the cache had slots
    decodes = passes[0].decodes
    assert (decodes.size, decodes.live, decodes.t_max) == (42, 2, longest + 1)
    assert passes[0].input_ids.shape[0] == 42
    assert got == plain.step(decode=["r1", "r0"])
    assert_same_state(snapshot(padded, "r2"), waiting)
    before = {rid: snapshot(padded, rid) for rid in padded.running()}
    assert padded.step(padding=3) == []  # padding alone: paid for, nothing else
    for rid, state in before.items():
        assert_same_state(snapshot(padded, rid), state)
    monkeypatch.undo()
    while plain.running():
        assert padded.step(decode=padded.running(), padding=2) == plain.decode_step()


STEP_ERRORS = [
    (dict(decode=["nope"]), "not running"),
    (dict(decode=["a", "a"]), "repeated"),
    (dict(prefill=[req("n", b"new")], decode=["a", "n"]), "prefilled and decoded"),
    (dict(decode=["a"], padding=-1), "padding"),
    (dict(prefill=[req("n", b"fine"), req("m", ())], decode=["a"]), "empty prompt"),
    (dict(prefill=[req("b", b"again")], decode=["a"]), "already running"),
    (dict(prefill=[GenerationRequest("n", (1, 2), SamplingParams(max_tokens=3), resume_ids=(5, 6, 7))]), "max_tokens"),
    (
        dict(prefill=[GenerationRequest("n", (1, 2), SamplingParams(max_tokens=9), resume_ids=(5, 99999))]),
        "outside vocabulary",
    ),
    (
        dict(prefill=[GenerationRequest("n", (1,) * 2000, SamplingParams(max_tokens=99), resume_ids=(5,) * 48)]),
        "max_context",
    ),
]


@pytest.mark.parametrize("kwargs, match", STEP_ERRORS)
def test_refused_step_changes_nothing(llama, kwargs, match):
    llama.prefill([req(r, f"prompt {r}".encode(), max_tokens=9, ignore_eos=True) for r in "abc"])
    llama.step(decode=["c"])  # c swapped to the front: the order is not the join order any more
    order = llama.running()
    before = {rid: snapshot(llama, rid) for rid in order}
    with pytest.raises(ValueError, match=match):
        llama.step(**kwargs)
    assert llama.running() == order and llama.runner.cache.size == len(order)
    for rid, state in before.items():
        assert_same_state(snapshot(llama, rid), state)


def test_max_context_counts_resumed_tokens(make_engine):
    engine = make_engine(max_context=16)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    with pytest.raises(ValueError, match="max_context"):
        engine.prefill([GenerationRequest("r", tuple(b"0123456789"), params, resume_ids=(65,) * 6)])
    events = engine.prefill([GenerationRequest("r", tuple(b"0123456789"), params, resume_ids=(65,) * 5)])
    assert [(e.index, e.finished, e.finish_reason) for e in events] == [(5, True, "length")]
    t5 = make_engine("tiny-t5", max_context=16)  # T5: the prompt is encoder input, not context
    with pytest.raises(ValueError, match="max_context"):
        t5.prefill([GenerationRequest("r", (1, 2), params, resume_ids=(65,) * 16)])
    assert t5.prefill([GenerationRequest("r", (1, 2), params, resume_ids=(65,) * 15)])[0].finish_reason == "length"


RESUME_CASES = {
    "greedy": dict(max_tokens=18, ignore_eos=True),
    "stop string": dict(max_tokens=30),  # picked from the uninterrupted text: it fires after the cuts
    "held back": dict(max_tokens=18),  # a stop string whose start keeps appearing: text is held back
}


def late_substring(text: str, start: int) -> str:
    """Two characters of ``text`` that first occur at ``start`` or later (and are whole characters)."""
    for i in range(start, len(text) - 1):
        piece = text[i : i + 2]
        if "\ufffd" not in piece and text.find(piece) == i:
            return piece
    raise AssertionError(f"no late substring in {text!r}")


def check_resume(engine, prompt: list[int], params: dict, cuts: tuple[int, ...]) -> None:
    """Each cut: a fresh request resumed from the first ``cut`` delivered tokens, joining a running
    neighbour in a mixed step, continues to exactly the uninterrupted tokens, text and reason."""
    full = all_events(engine, [req("r", prompt, **params)])
    tokens = [e.token_id for e in full]
    assert len(tokens) > max(cuts)
    for cut in cuts:
        delivered = "".join(e.text for e in full[:cut])
        resumed = GenerationRequest(
            "r", tuple(prompt), SamplingParams(**params), resume_ids=tuple(tokens[:cut]), resume_text=delivered
        )
        engine.prefill([req("neighbour", b"sharing the batch", max_tokens=40, ignore_eos=True)])
        events = engine.step(prefill=[resumed], decode=["neighbour"])
        mine = [e for e in events if e.request_id == "r"]
        assert mine[0].index == cut
        while "r" in engine.running():
            mine += [e for e in engine.step(decode=engine.running()) if e.request_id == "r"]
        engine.abort("neighbour")
        assert [e.token_id for e in mine] == tokens[cut:]
        assert [e.index for e in mine] == list(range(cut, len(tokens)))
        assert delivered + "".join(e.text for e in mine) == "".join(e.text for e in full)
        assert mine[-1].finish_reason == full[-1].finish_reason


@pytest.mark.parametrize(
    "name, case",
    [(name, case) for name in ARCHS for case in RESUME_CASES if (name, case) != ("tiny-t5", "stop string")],
)  # tiny T5 repeats itself
def test_resumed_request_continues_exactly(make_engine, name, case):
    engine = make_engine(name)
    prompt, params = list(b"Resume me, please: "), dict(RESUME_CASES[case])
    if case != "greedy":
        text = run_to_end(engine, [req("probe", prompt, max_tokens=30, ignore_eos=True)]).text["probe"]
        params["stop"] = (late_substring(text, 13) if case == "stop string" else text[:2] + "\x01never",)
    check_resume(engine, prompt, params, cuts=(1, 6, 11))


@pytest.mark.smollm2
def test_smollm2_resumed_request_continues_exactly(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three colours."}]))
    check_resume(smollm2, prompt, dict(max_tokens=14, ignore_eos=True), cuts=(1, 9))


def test_resumed_sampled_request_restarts_its_generator(llama):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=4, ignore_eos=True)
    first = run_to_end(llama, [GenerationRequest("s", tuple(b"sampled"), params)]).tokens["s"]
    resumed = GenerationRequest("s", tuple(b"sampled"), params, resume_ids=tuple(first[:5]))
    runs = []
    for _ in range(2):
        out = Collector()
        out.tokens["s"] = list(first[:5])
        out.add(llama.prefill([resumed]))
        while llama.running():
            out.add(llama.decode_step())
        runs.append(out.tokens["s"])
    assert runs[0] == runs[1] and len(runs[0]) == 12  # same seed, same continuation; max_tokens counts all


@pytest.mark.parametrize("name", ARCHS)
def test_handoff_after_subset_steps_and_of_resumed_requests(make_engine, name):
    rnd = random.Random(11)
    source, target = make_engine(name), make_engine(name)
    requests = [
        GenerationRequest(r.request_id, r.prompt_ids, SamplingParams(**{**r.params.__dict__, "max_tokens": 20}))
        for r in make_requests(rnd, 5)
    ]
    solo = {r.request_id: run_to_end(source, [r]).tokens[r.request_id] for r in requests}
    out = Collector()
    out.add(source.prefill(requests[:4]))
    out.add(source.step(decode=["q3", "q1"], padding=2))
    out.add(source.step(prefill=[requests[4]], decode=["q2", "q3"]))
    target.prefill([req("resident", b"already here", max_tokens=40, ignore_eos=True)])
    for rid in ("q3", "q0"):
        target.import_request(KVHandoff.from_bytes(source.export_request(rid).to_bytes()))
    # a greedy request given back after 4 tokens and resumed here
    greedy = next(r for r in requests if r.params.temperature == 0 and r.request_id in source.running())
    source.abort(greedy.request_id)
    resumed = GenerationRequest(
        greedy.request_id, greedy.prompt_ids, greedy.params, resume_ids=tuple(solo[greedy.request_id][:4])
    )
    out.tokens[greedy.request_id] = list(solo[greedy.request_id][:4])
    out.add(target.step(prefill=[resumed], decode=["q0"], padding=1))
    while source.running() or target.running():
        for engine in (source, target):
            running = [rid for rid in engine.running() if rid != "resident"]
            if running:
                out.add([e for e in engine.step(decode=running[::2] or running) if e.request_id != "resident"])
        if target.running() == ["resident"]:
            target.abort("resident")
    assert {rid: out.tokens[rid] for rid in solo} == solo
