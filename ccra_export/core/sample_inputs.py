"""Seeded random graph inputs for parity checks (numpy only)."""

from __future__ import annotations

import numpy as np

from ccra_export.core.config import ModelConfig


def random_inputs(
    config: ModelConfig,
    *,
    batch: int,
    text_len: int,
    seed: int,
    token_embeddings: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Inputs in graph order: normalised pixels, and for CCRA instruction embeddings plus a padded mask.

    ``token_embeddings`` (the language model's embedding table, when a checkpoint has one) makes
    the text inputs real token embeddings at their real scale; otherwise they are N(0, 1).
    Row 0 of the mask is full, later rows are right-padded to random lengths, so parity covers
    both the full and the masked softmax.
    """
    rng = np.random.default_rng(seed)
    v = config.vision
    feeds = {"pixel_values": rng.standard_normal((batch, v.num_channels, v.image_size, v.image_size), np.float32)}
    if config.ccra is None:
        return feeds
    if token_embeddings is not None:
        ids = rng.integers(0, token_embeddings.shape[0], size=(batch, text_len))
        feeds["text_embeds"] = np.ascontiguousarray(token_embeddings[ids], dtype=np.float32)
    else:
        feeds["text_embeds"] = rng.standard_normal((batch, text_len, config.text_hidden_size), np.float32)
    mask = np.ones((batch, text_len), np.int64)
    for row in range(1, batch):
        mask[row, rng.integers(1, text_len + 1) :] = 0
    feeds["text_mask"] = mask
    return feeds
