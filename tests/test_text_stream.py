"""Streaming detokenization with a real byte-level tokenizer: multi-byte characters split across tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ccra_export.runtime.text_stream import REPLACEMENT, TextStream


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte (GPT-2's byte-level alphabet, no merges): every non-ASCII
    character spans 2-4 tokens, the worst case for streaming."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@pytest.mark.parametrize(
    "text", ["plain ascii", "né à Zürich", "日本語のテキスト", "emoji 🙂👍 end", "混ざった mix 🙂"]
)
def test_pieces_join_to_the_final_text_without_replacement_characters(byte_tokenizer, text):
    ids = byte_tokenizer.encode(text).ids
    assert len(ids) == len(text.encode())  # really one token per byte
    stream = TextStream(byte_tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == byte_tokenizer.decode(ids) == text
    assert not any(REPLACEMENT in p for p in pieces)
    naive = byte_tokenizer.decode(ids[:1])  # what emitting every partial decode would have printed
    assert (REPLACEMENT in naive) is (not text[0].isascii())


def test_an_incomplete_character_at_the_end_comes_out_on_flush(byte_tokenizer):
    ids = byte_tokenizer.encode("ok 🙂").ids[:-1]  # the emoji's last byte never arrives (max tokens hit)
    stream = TextStream(byte_tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "ok "
    assert "".join(pieces) + stream.flush() == byte_tokenizer.decode(ids)
