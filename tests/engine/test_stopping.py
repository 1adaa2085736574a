"""Stop conditions: EOS, stop strings, max_tokens, forced length, context limit."""

from __future__ import annotations

from engine.stops import TextTracker
from tests.engine.conftest import req, run_to_end


class CharTokenizer:
    """One token per character, ids are code points; 0 is EOS."""

    eos_token_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)

    def apply_chat_template(self, messages):
        raise NotImplementedError


def feed(tracker: TextTracker, text: str) -> tuple[list[str], bool]:
    chunks, ids = [], []
    for ch in text:
        ids.append(ord(ch))
        chunk, stopped = tracker.push(ids)
        chunks.append(chunk)
        if stopped:
            return chunks, True
    return chunks, False


def test_stop_string_is_held_back_and_cut():
    chunks, stopped = feed(TextTracker(CharTokenizer(), ("END",)), "abcENxyEND tail")
    assert stopped
    assert "".join(chunks) == "abcENxy"
    assert chunks[3:5] == ["", ""]  # "E", "EN" could start the stop string: held back
    assert chunks[5] == "ENx"  # released once "x" rules it out


def test_earliest_of_several_stop_strings_wins():
    chunks, stopped = feed(TextTracker(CharTokenizer(), ("zzz", "b.")), "aab.cc")
    assert stopped and "".join(chunks) == "aa"


def test_finish_releases_held_text():
    tracker = TextTracker(CharTokenizer(), ("STOP",))
    chunks, stopped = feed(tracker, "ok ST")
    assert not stopped and "".join(chunks) == "ok "
    assert tracker.finish([ord(c) for c in "ok ST"]) == "ST"


def test_engine_stops_on_eos(llama):
    solo = run_to_end(llama, [req("r", b"eos test", max_tokens=12, ignore_eos=True)]).tokens["r"]
    eos = solo[4]
    first = solo.index(eos)
    llama.stop_token_ids = frozenset({eos})
    out = run_to_end(llama, [req("r", b"eos test", max_tokens=12)])
    assert out.tokens["r"] == solo[: first + 1]
    assert out.reason["r"] == "stop"
    forced = run_to_end(llama, [req("f", b"eos test", max_tokens=12, ignore_eos=True)])
    assert forced.tokens["f"] == solo and forced.reason["f"] == "length"


def test_engine_stop_string_cuts_text(llama):
    solo = run_to_end(llama, [req("r", b"stop string", max_tokens=12, ignore_eos=True)])
    text = solo.text["r"]
    stop = text[5:7]
    out = run_to_end(llama, [req("s", b"stop string", max_tokens=12, stop=(stop,))])
    assert out.reason["s"] == "stop"
    assert out.text["s"] == text[: text.index(stop)]


def test_max_tokens_and_text(llama):
    out = run_to_end(llama, [req("r", b"count", max_tokens=5, ignore_eos=True)])
    assert len(out.tokens["r"]) == 5 and out.reason["r"] == "length"
    assert out.text["r"] == llama.tokenizer.decode(out.tokens["r"])


def test_context_limit_ends_request(make_engine):
    engine = make_engine(max_context=16)
    out = run_to_end(engine, [req("r", b"0123456789", max_tokens=100, ignore_eos=True)])
    assert len(out.tokens["r"]) == 6 and out.reason["r"] == "length"


def test_sampling_respects_top_k_and_top_p():
    import torch

    from engine.api import SamplingParams
    from engine.sampling import make_generator, sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    params = [
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=1.0),
    ]
    seen: list[set[int]] = [set(), set(), set()]
    gens = [make_generator(f"r{i}", p) for i, p in enumerate(params)]
    for _ in range(300):
        for i, token in enumerate(sample(logits, params, gens)):
            seen[i].add(token)
    assert seen[0] == {0, 1}  # top-2
    assert seen[1] == {0, 1}  # 0.5 < 0.6, so the second token is still needed
    assert seen[2] == {0, 1, 2, 3}
    greedy = sample(logits, [SamplingParams()] * 3, gens)
    assert greedy == [0, 0, 0]


def test_multibyte_characters_are_never_split(llama):
    text = "héllo ✓ 🎉 done"
    ids = list(text.encode())
    tracker = TextTracker(llama.tokenizer, ("🎉 d",))
    chunks = [tracker.push(ids[: i + 1]) for i in range(len(ids))]
    released = [c for c, _ in chunks]
    assert not any("\ufffd" in c for c in released)
    stopped_at = next(i for i, (_, stopped) in enumerate(chunks) if stopped)
    assert "".join(released[: stopped_at + 1]) == "héllo ✓ "
    assert stopped_at == len("héllo ✓ 🎉 d".encode()) - 1


def test_resumed_tracker_continues_after_emitted_text(llama):
    ids = list("abc✓def".encode())
    first = TextTracker(llama.tokenizer, ())
    out = "".join(first.push(ids[: i + 1])[0] for i in range(5))  # "abc" + 2 of the 3 bytes of ✓
    assert out == "abc"
    resumed = TextTracker(llama.tokenizer, (), emitted=first.emitted)
    rest = "".join(resumed.push(ids[: i + 1])[0] for i in range(5, len(ids)))
    assert out + rest + resumed.finish(ids) == "abc✓def"
