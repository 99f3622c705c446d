"""Instruction embeddings for calibration and held-out parity inputs (CCRA's text input)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

TOKENIZER_FILE = "tokenizer.json"


class TextEmbedder:
    """Prompt -> rows of an embedding table, right-padded into [B, T, D] with a [B, T] mask."""

    def __init__(self, table: np.ndarray, encode: Callable[[str], list[int]], source: str) -> None:
        self.table = np.asarray(table, dtype=np.float32)
        self.encode = encode
        self.source = source

    @classmethod
    def from_checkpoint(cls, directory: Path, table: np.ndarray) -> TextEmbedder:
        """The checkpoint's tokenizer (tokenizer.json) over its LM embedding table."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            return cls.bytes_over(table, f"UTF-8 bytes over the embedding table (no {TOKENIZER_FILE})")
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        vocab = table.shape[0]
        return cls(
            table, lambda text: [i % vocab for i in tokenizer.encode(text).ids], f"{TOKENIZER_FILE} + embedding table"
        )

    @classmethod
    def seeded(cls, width: int, seed: int = 0) -> TextEmbedder:
        """For random-weight presets: a seeded N(0, 1) table over UTF-8 bytes (no tokenizer exists)."""
        table = np.random.default_rng(seed).standard_normal((256, width), dtype=np.float32)
        return cls.bytes_over(table, "seeded byte embeddings (random-weight preset)")

    @classmethod
    def bytes_over(cls, table: np.ndarray, source: str) -> TextEmbedder:
        vocab = table.shape[0]
        return cls(table, lambda text: [b % vocab for b in text.encode()], source)

    def token_count(self, prompt: str) -> int:
        return max(1, len(self.encode(prompt)))

    def embed(self, prompts: Sequence[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``length``: pad to this many tokens (default: the longest prompt); longer prompts are cut."""
        ids = [(self.encode(p) or [0])[:length] for p in prompts]
        length = length or max(len(i) for i in ids)
        embeds = np.zeros((len(ids), length, self.table.shape[1]), np.float32)
        mask = np.zeros((len(ids), length), np.int64)
        for row, tokens in enumerate(ids):
            embeds[row, : len(tokens)] = self.table[tokens]
            mask[row, : len(tokens)] = 1
        return embeds, mask
