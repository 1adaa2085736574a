"""Incremental detokenization with stop strings, for one request.

The client must never see a stop string, nor half of a multi-byte character, so text that could
still turn into either is held back until the next token decides.
"""

from __future__ import annotations

from engine.api import Tokenizer


class TextTracker:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], emitted: str = "") -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self.emitted = emitted  # text already returned to the client

    def push(self, generated: list[int]) -> tuple[str, bool]:
        """Text the newest token releases, and whether a stop string has now appeared."""
        text = self._tokenizer.decode(generated).rstrip("\ufffd")
        hit = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hit:
            return self._release(text[: min(hit)]), True
        return self._release(text[: len(text) - self._held_back(text)]), False

    def finish(self, generated: list[int]) -> str:
        """The request ended for another reason: release everything still held back."""
        return self._release(self._tokenizer.decode(generated))

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
        new = visible[len(self.emitted):] if visible.startswith(self.emitted) else ""
        if new:
            self.emitted = visible
        return new
