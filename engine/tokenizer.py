"""Tokenizers: a ``tokenizers.Tokenizer`` behind the ``engine.api.Tokenizer`` protocol.

Built from a ``tokenizer.json`` (Hugging Face folders, tiny models) or from GGUF metadata (the
vocabulary, merges and chat template that llama.cpp files carry).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TextTokenizer:
    def __init__(
        self,
        tok: HfTokenizer,
        *,
        eos_token_id: int,
        bos_token_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tok
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: Path, **kwargs) -> TextTokenizer:
        return cls(HfTokenizer.from_file(str(path)), **kwargs)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a raw prompt")
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        return template.render(messages=list(messages), add_generation_prompt=True, bos_token="", eos_token="")


def byte_level_bpe(
    vocab: dict[str, int], merges: list[tuple[str, str]], special: list[str], *, split_digits: bool = False
) -> HfTokenizer:
    """A GPT-2 style byte-level BPE; ``special`` tokens are matched whole before splitting."""
    tok = HfTokenizer(models.BPE(vocab=vocab, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special)
    return tok


def byte_tokenizer(special: list[str]) -> HfTokenizer:
    """256 byte tokens (ids 0..255, no merges) then ``special``: round-trips any text."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=lambda ch: _gpt2_byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_char)}
    return byte_level_bpe(vocab, [], special)


def _gpt2_byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    code = ord(ch)
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def hf_tokenizer(folder: Path, config: dict[str, Any]) -> TextTokenizer:
    """The tokenizer of a Hugging Face folder (tokenizer.json, tokenizer_config.json; ids from config.json)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no tokenizer.json")
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    tok = TextTokenizer.from_file(path, eos_token_id=0, chat_template=tcfg.get("chat_template"))
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        eos_text = tcfg.get("eos_token")
        eos_text = eos_text.get("content") if isinstance(eos_text, dict) else eos_text
        eos = tok.token_id(eos_text) if eos_text else None
    if eos is None:
        raise ValueError(f"{folder}: no eos_token_id in config.json nor eos_token in tokenizer_config.json")
    tok.eos_token_id = int(eos)
    tok.bos_token_id = config.get("bos_token_id")
    tok.add_bos = bool(tcfg.get("add_bos_token", False)) and tok.bos_token_id is not None
    return tok
