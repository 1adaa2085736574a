import numpy as np
import pytest

from loadgen.prompts import WORDS, approx_prompt, exact_prompt, make_prompts
from tests.brokers import need_smollm2


def test_approx_prompt_has_one_word_per_token():
    text = approx_prompt(50, np.random.default_rng(0))
    assert len(text.split()) == 50 and all(w in WORDS for w in text.split())


def test_prompts_differ_between_requests():
    prompts = make_prompts(np.array([30, 30, 30]), np.random.default_rng(1))
    assert len(set(prompts)) == 3


class CharPairTokenizer:
    """A toy reversible tokenizer whose tokens are pairs of characters: words != tokens."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.pieces: list[str] = []

    def encode(self, text):
        ids = []
        for i in range(0, len(text), 2):
            piece = text[i : i + 2]
            if piece not in self.vocab:
                self.vocab[piece] = len(self.pieces)
                self.pieces.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_exact_prompt_hits_the_token_count():
    rng = np.random.default_rng(2)
    tok = CharPairTokenizer()
    for n in (1, 7, 64, 300):
        text = exact_prompt(n, rng, tok.encode, tok.decode)
        assert len(tok.encode(text)) == n
        assert len(text.split()) != n or n == 1  # the word count alone would have missed


def test_exact_prompt_refuses_zero():
    with pytest.raises(ValueError):
        exact_prompt(0, np.random.default_rng(0), lambda t: [], lambda i: "")


@pytest.mark.smollm2
@pytest.mark.slow
def test_word_prompts_are_one_token_per_word_for_smollm2():
    from engine.gguf_loader import read_gguf, smollm2_path

    need_smollm2()
    path = smollm2_path()
    tok = read_gguf(path)[2]
    rng = np.random.default_rng(3)
    for n in (1, 50, 400):
        assert len(tok.encode(approx_prompt(n, rng))) == n
    assert len(tok.encode(exact_prompt(123, rng, tok.encode, tok.decode))) == 123


def test_tokenizer_auto_uses_the_served_models_tokenizer_and_context():
    """tiny-llama's tokenizer is byte-level: a word prompt of n words is ~5n tokens, so prompts
    are sized with its own tokenizer, and its context caps prompt + output."""
    from loadgen.cli import _prompt_tokenizer
    from loadgen.prompts import exact_prompt

    tok = _prompt_tokenizer("auto", "tiny-llama")
    assert tok.max_context == 2048 and tok.source == "tiny-llama's tokenizer"
    text = exact_prompt(300, np.random.default_rng(0), tok.encode, tok.decode)
    assert len(tok.encode(text)) == 300 and len(text.split()) < 100


def test_tokenizer_auto_falls_back_to_word_prompts_and_names_fail_loudly():
    from common.cli import CliError
    from loadgen.cli import _prompt_tokenizer

    assert _prompt_tokenizer("auto", "no-such-model").encode is None
    assert _prompt_tokenizer("none", "tiny-llama").encode is None
    with pytest.raises(CliError):
        _prompt_tokenizer("no-such-model", None)
