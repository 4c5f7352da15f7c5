"""Incremental, UTF-8-safe detokenization: each step decodes only a short window of tokens.

Decoding a token alone can lose context (SentencePiece drops a leading space at the start of a
text; a character split over byte-fallback tokens decodes to U+FFFD until its last byte arrives).
So every step decodes the window ``tokens[prefix:]`` and subtracts the already-emitted
``tokens[prefix:read]``, and holds text back while it ends in an incomplete character.
"""

from typing import List

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into a growing string, decoding O(window) per token.

    The text equals ``tokenizer.decode(all tokens)`` whenever the tokenizer's decode is
    concatenative over whole characters (true for SentencePiece and byte-level BPE).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: List[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens up to here are already in self.text

    def add(self, token: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.tokens.append(token)
        if self._read == 0:
            # the first tokens decode on their own, as the whole output would
            new_text = self.tokenizer.decode(self.tokens)
            if new_text.endswith(REPLACEMENT):
                return ""
            self.text = new_text
            self._read = len(self.tokens)
            return new_text
        window_before = self.tokenizer.decode(self.tokens[self._prefix:self._read])
        window_now = self.tokenizer.decode(self.tokens[self._prefix:])
        if window_now.endswith(REPLACEMENT) or not window_now.startswith(window_before):
            return ""
        delta = window_now[len(window_before):]
        self.text += delta
        self._prefix = self._read
        self._read = len(self.tokens)
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, decoded as is."""
        if self._read == len(self.tokens):
            return ""
        if self._read == 0:
            full = self.tokenizer.decode(self.tokens)
            delta = full
        else:
            before = self.tokenizer.decode(self.tokens[self._prefix:self._read])
            now = self.tokenizer.decode(self.tokens[self._prefix:])
            delta = now[len(before):] if now.startswith(before) else now
        self.text += delta
        self._prefix = self._read = len(self.tokens)
        return delta
