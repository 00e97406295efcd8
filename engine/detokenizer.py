"""Incremental detokenization and stop strings, per sequence.

Decoding token by token is wrong for byte-level tokenizers: a multi-byte UTF-8 character can be
split across tokens, and a lone piece decodes to U+FFFD. So each step decodes a short window of
recent tokens twice (with and without the new ones) and emits the difference only once it no
longer ends in a replacement character. A final flush at the end guarantees that the deltas add
up to exactly ``decode(all output tokens)``.

Stop strings: text that could still be the start of a stop string is held back; when a stop
string appears, the output is cut before it and the sequence finishes.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
WINDOW = 6  # tokens of left context: enough for merges that change earlier text


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        # Start with a little prompt context so that the first output token decodes as it would
        # in running text (e.g. SentencePiece's leading-space handling).
        self._tokens: list[int] = list(prompt_token_ids[-WINDOW:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._num_prompt_context = len(self._tokens)
        self.output_text = ""  # all decided + undecided text so far (stop string removed)
        self._emitted = 0  # chars of output_text already handed out
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.stopped_by: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add_tokens(self, token_ids: list[int]) -> None:
        """Feed new output tokens; updates ``output_text`` and ``stopped_by``."""
        if self.stopped_by is not None:
            return
        self._tokens.extend(token_ids)
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            new = full[len(prefix) :]
            self._prefix_offset = max(self._read_offset, len(self._tokens) - WINDOW)
            self._read_offset = len(self._tokens)
            self._append(new)

    def _append(self, new: str) -> None:
        start = max(0, len(self.output_text) - self._hold)
        self.output_text += new
        if not self._stop:
            return
        best: tuple[int, str] | None = None
        for s in self._stop:
            pos = self.output_text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            self.output_text = self.output_text[: best[0]]
            self.stopped_by = best[1]

    def finish(self) -> None:
        """Make ``output_text`` final: decode the whole output once (catches any held bytes)."""
        if self.stopped_by is None:
            out_ids = self._tokens[self._num_prompt_context :]
            full = self._decode(out_ids)
            if full.startswith(self.output_text) and len(full) > len(self.output_text):
                self._append(full[len(self.output_text) :])

    def take(self, final: bool) -> str:
        """The text that may be shown now (everything when ``final``), not shown before."""
        end = len(self.output_text)
        if not final and self.stopped_by is None:
            end -= self._partial_stop_len()
        if end <= self._emitted:
            return ""
        text = self.output_text[self._emitted : end]
        self._emitted = end
        return text

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        text = self.output_text
        for n in range(min(self._hold, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
