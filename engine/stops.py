"""Incremental detokenization with stop strings, for one request.

The client must never see a stop string, nor half of a multi-byte character, so text that could
still turn into either is held back until the next token decides.

Each step decodes only a short window of ids (the tokens since the last complete text, plus the
ones before them for context) and appends the difference, so a step costs the same at token 5 and
at token 5000.
"""

from __future__ import annotations

from engine.api import Tokenizer


class TextTracker:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], emitted: str = "") -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max(map(len, self._stop), default=0)
        self.emitted = emitted  # text already returned to the client
        self._text = ""  # text of ids[:_read]; a request resumed from a hand-off rebuilds it once
        self._prefix = 0  # ids[_prefix:_read] is the context the next window decodes after
        self._read = 0

    def push(self, generated: list[int]) -> tuple[str, bool]:
        """Text the newest token releases, and whether a stop string has now appeared."""
        new = self._decode_window(generated, final=False)
        self._text += new
        text = self._text
        start = max(0, len(text) - len(new) - self._longest_stop + 1)
        hit = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if hit:
            return self._release(text[: min(hit)]), True
        return self._release(text[: len(text) - self._held_back(text)]), False

    def finish(self, generated: list[int]) -> str:
        """The request ended for another reason: release everything still held back."""
        self._text += self._decode_window(generated, final=True)
        return self._release(self._text)

    def _decode_window(self, ids: list[int], *, final: bool) -> str:
        decode = self._tokenizer.decode
        before = decode(ids[self._prefix : self._read])
        window = decode(ids[self._prefix :])
        if len(window) <= len(before) or (window.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or a multi-byte character is still incomplete
        self._prefix, self._read = self._read, len(ids)
        return window[len(before) :]

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that starts some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, visible: str) -> str:
        if len(visible) <= len(self.emitted) or not visible.startswith(self.emitted):
            return ""
        new = visible[len(self.emitted) :]
        self.emitted = visible
        return new
