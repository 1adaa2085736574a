"""Requests joining and leaving a running batch decode exactly as they would alone."""

from __future__ import annotations

import pytest

from tests.engine.conftest import Collector, req, run_to_end

PROMPTS = {
    "a": list(b"Once upon a time"),
    "b": list(b"hi"),
    "c": list(b"The quick brown fox jumps over the lazy dog, twice."),
    "d": list(b"x"),
    "e": list(b"0123456789abcdef"),
}
PARAMS = {
    "a": dict(max_tokens=20, ignore_eos=True),
    "b": dict(max_tokens=7, ignore_eos=True),
    "c": dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=1, ignore_eos=True),
    "d": dict(max_tokens=25, temperature=1.3, top_k=20, seed=2, ignore_eos=True),
    "e": dict(max_tokens=3, ignore_eos=True),
}


def alone(engine, rid: str) -> list[int]:
    return run_to_end(engine, [req(rid, PROMPTS[rid], **PARAMS[rid])]).tokens[rid]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5"])
def test_join_and_leave_match_solo_runs(make_engine, name):
    engine = make_engine(name)
    solo = {rid: alone(engine, rid) for rid in PROMPTS}
    assert len(set(map(tuple, solo.values()))) == len(solo)  # the model is not degenerate

    out = Collector()
    out.add(engine.prefill([req("a", PROMPTS["a"], **PARAMS["a"]), req("b", PROMPTS["b"], **PARAMS["b"])]))
    for _ in range(3):
        out.add(engine.decode_step())
    out.add(engine.prefill([req("c", PROMPTS["c"], **PARAMS["c"])]))  # joins mid-run
    for _ in range(5):
        out.add(engine.decode_step())
    assert "b" not in engine.running()  # b left after 7 tokens
    out.add(engine.prefill([req("d", PROMPTS["d"], **PARAMS["d"]), req("e", PROMPTS["e"], **PARAMS["e"])]))
    while engine.running():
        out.add(engine.decode_step())

    assert dict(out.tokens) == solo
    assert all(reason == "length" for reason in out.reason.values())
    assert {rid: len(t) for rid, t in out.tokens.items()} == {rid: p["max_tokens"] for rid, p in PARAMS.items()}


def test_running_lists_slots_and_compacts(llama):
    llama.prefill([req(r, PROMPTS[r], **PARAMS[r]) for r in "abcde"])
    assert llama.running() == list("abcde")
    for _ in range(2):
        llama.decode_step()  # e (3 tokens) finishes on the second step
    assert sorted(llama.running()) == list("abcd")
    assert len(llama.running()) == llama.runner.cache.size
    llama.abort("b")
    llama.abort("nope")
    assert sorted(llama.running()) == list("acd")


def test_first_token_can_finish_a_request(llama):
    events = llama.prefill([req("one", b"hello", max_tokens=1), req("two", b"hello", max_tokens=2)])
    assert [(e.request_id, e.finished, e.finish_reason) for e in events] == [
        ("one", True, "length"),
        ("two", False, None),
    ]
    assert llama.running() == ["two"]


def test_batched_prefill_matches_single_prefill(llama):
    prompts = [PROMPTS[r] for r in "abcde"]
    together = [e.token_id for e in llama.prefill([req(f"t{i}", p, max_tokens=1) for i, p in enumerate(prompts)])]
    single = [llama.prefill([req(f"s{i}", p, max_tokens=1)])[0].token_id for i, p in enumerate(prompts)]
    assert together == single


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_failed_prefill_leaves_running_batch_intact(make_engine, monkeypatch, name):
    engine = make_engine(name)
    solo = alone(engine, "a")
    out = Collector()
    out.add(engine.prefill([req("a", PROMPTS["a"], **PARAMS["a"])]))
    model = engine.runner.model

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "encode" if name == "tiny-t5" else "forward", broken)
    with pytest.raises(RuntimeError):
        engine.prefill([req("b", PROMPTS["b"], **PARAMS["b"])])
    monkeypatch.undo()
    assert engine.running() == ["a"]
    while engine.running():
        out.add(engine.decode_step())
    assert out.tokens["a"] == solo


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5"])
def test_random_schedule_of_joins_aborts_and_handoffs(make_engine, name):
    """Many requests moved around two engines in a seeded random order each decode exactly as alone."""
    import random

    from engine.api import KVHandoff

    rnd = random.Random(42)
    engines = [make_engine(name), make_engine(name)]
    requests = []
    for i in range(16):
        params = dict(max_tokens=rnd.randint(1, 14), ignore_eos=i % 4 != 1)
        if i % 3 == 0:
            params.update(temperature=0.9, top_k=rnd.choice([0, 30]), seed=i)
        prompt = [rnd.randrange(256) for _ in range(rnd.randint(1, 30))]
        if i % 4 == 1:  # a stop string taken from the middle of what this request would say
            text = run_to_end(
                engines[0], [req("probe", prompt, **{**params, "max_tokens": 40, "ignore_eos": True})]
            ).text["probe"]
            chars = [c for c in text[len(text) // 2 :] if c != "\ufffd"]
            params.update(stop=tuple(chars[:1]) + ("never said",), max_tokens=40)
        requests.append(req(f"q{i}", prompt, **params))
    solo = {r.request_id: run_to_end(engines[0], [r]) for r in requests}

    out, pending, aborted = Collector(), list(requests), set()
    while pending or any(e.running() for e in engines):
        move = rnd.random()
        if pending and move < 0.3:
            take = pending[: rnd.randint(1, 4)]
            pending = pending[len(take) :]
            out.add(rnd.choice(engines).prefill(take))
        elif move < 0.4:
            source, target = rnd.sample(engines, 2)
            if source.running():
                target.import_request(
                    KVHandoff.from_bytes(source.export_request(rnd.choice(source.running())).to_bytes())
                )
        elif move < 0.43:
            engine = rnd.choice(engines)
            if engine.running():
                victim = rnd.choice(engine.running())
                engine.abort(victim)
                aborted.add(victim)
        else:
            for engine in engines:
                out.add(engine.decode_step())
    for rid, alone_out in solo.items():
        tokens = alone_out.tokens[rid]
        if rid in aborted:
            assert out.tokens[rid] == tokens[: len(out.tokens[rid])]
        else:
            assert (out.tokens[rid], out.text[rid], out.reason[rid]) == (
                tokens,
                alone_out.text[rid],
                alone_out.reason[rid],
            ), rid
    assert len(aborted) < len(solo)
    assert "stop" in {o.reason[rid] for rid, o in solo.items()}  # some stop string did fire
