"""Prompts of a requested token length.

Prompt text is not part of a trace or a task description, so we make it: random picks from a list
of very common English words, each written with a leading space, which BPE tokenizers (GPT-2,
Llama, SmolLM2) encode as a single token. So ``n`` words are about ``n`` tokens with any typical
tokenizer. With a tokenizer at hand, ``exact_prompt`` makes the count exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# Frequent short words; each is one token (with its leading space) in common BPE vocabularies.
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        """the of and to in is was for that on as with by he at from his it an were are which
    be this had not but or have they one all their she her we been has there you would more
    when if him can no so out up into time only what new some could about other then them
    these first two also after may most many over such after where who make made like way
    well back even years much how through our good each those long day work very use part
    world under last right life down old great same state small man people just house year
    still between high own found water place while since now never both life city name
    left end set home along water three four five six night light point open hand school
    large went line side best power group number often line great start give few every
    little help word land early next show around form public real late near play family
    level order book big black white red game music story""".split()
    )
)


def approx_prompt(num_tokens: int, rng: np.random.Generator) -> str:
    """About ``num_tokens`` tokens of text: that many random common words."""
    if num_tokens < 1:
        raise ValueError(f"a prompt needs at least 1 token, got {num_tokens}")
    picks = rng.integers(0, len(WORDS), size=num_tokens)
    return "".join(" " + WORDS[i] for i in picks).lstrip()


def exact_prompt(
    num_tokens: int,
    rng: np.random.Generator,
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
) -> str:
    """Text that ``encode`` turns into exactly ``num_tokens`` ids (without special tokens).

    Builds a slightly longer word prompt, cuts its ids near the target and decodes each cut until
    one re-encodes to exactly the target length (cuts at word pieces may merge differently).
    """
    if num_tokens < 1:
        raise ValueError(f"a prompt needs at least 1 token, got {num_tokens}")
    ids = list(encode(approx_prompt(num_tokens + 16, rng)))
    for delta in (0, -1, 1, -2, 2, -3, 3, -4, 4):
        cut = num_tokens + delta
        if 1 <= cut <= len(ids):
            text = decode(ids[:cut])
            if len(encode(text)) == num_tokens:
                return text
    raise ValueError(f"could not build a prompt of exactly {num_tokens} tokens")


def make_prompts(
    input_tokens: np.ndarray,
    rng: np.random.Generator,
    encode: Callable[[str], Sequence[int]] | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> list[str]:
    """One prompt per requested length; exact when a tokenizer's encode/decode are given."""
    if encode is not None and decode is not None:
        return [exact_prompt(int(n), rng, encode, decode) for n in input_tokens]
    return [approx_prompt(int(n), rng) for n in input_tokens]
