"""Incremental detokenization for streaming: the pieces join to exactly the final decode.

Byte-level tokenizers split one character across tokens (a UTF-8 sequence of 2-4 bytes). Decoding
the tokens so far then ends in U+FFFD until the sequence completes, and emitting that would print
a replacement character the final text does not have. Text is therefore held back while it ends
in an incomplete sequence, as onnxruntime-genai's TokenizerStream and transformers' TextStreamer do.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids one by one; get the newly stable text for each."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._emitted = ""

    def push(self, token: int) -> str:
        """The text this token completes ('' while a character is still incomplete)."""
        self._tokens.append(token)
        return self._advance(hold_incomplete=True)

    def flush(self) -> str:
        """Whatever was held back (an incomplete sequence at the very end decodes to U+FFFD)."""
        return self._advance(hold_incomplete=False)

    def _advance(self, hold_incomplete: bool) -> str:
        text = self._tokenizer.decode(self._tokens)
        if (hold_incomplete and text.endswith(REPLACEMENT)) or not text.startswith(self._emitted):
            return ""
        piece, self._emitted = text[len(self._emitted) :], text
        return piece
