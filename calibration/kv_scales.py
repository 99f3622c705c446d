"""Scales for an INT8 KV cache, calibrated on the unquantized-KV decoder (no torch).

onnxruntime-genai's builder quantizes the keys and values GroupQueryAttention writes with static
symmetric scales it reads from a JSON file (``kv_cache_scale_file``): per layer one scale
(``int8_per_tensor``) or one per key/value channel (``int8_per_channel``), each ``threshold / 128``
(the builder's INT8 divisor). The threshold here is the absolute maximum the same decoder, built
without KV quantization, writes on the calibration prompts, with 1.5x headroom: a maximum over a few
hundred tokens is exceeded later by a longer or different prompt, and a clipped value costs more
than a coarser step (measured in docs/language-model.md). Keys are stored after the rotary
embedding, which turns each channel pair (d, d + head_size/2) by a position-dependent angle:
a short prompt sees the slow pairs barely turned, so each key channel is bounded by its pair's
norm (invariant under the rotation, as the builder's own calibrator does) and the scales hold at
every position of the context, not only the calibration prompts' few.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ccra_export.core.errors import CCRAExportError
from ccra_export.runtime.language_model import LanguageModel

#: the builder's divisor for INT8 scales (its KV_CACHE_CALIBRATION_QMAX["int8"]), recorded in the file
QMAX = 128.0
#: a floor for a channel the prompts never excite (a zero scale is refused by the builder)
MIN_THRESHOLD = 1e-6
#: thresholds = HEADROOM x the calibration maximum. On the 0.5B-class random model, 600 tokens into
#: a prompt, 1-4% of the values exceed the bare maximum over the ~460 calibration tokens (by up to
#: 2.8x): mean KL against the unquantized cache 2.7e-3 there, 3.9e-4 with 1.5x headroom; on the demo
#: the short-prompt figures stay as they were (9e-4).
HEADROOM = 1.5
SCALES_FILE = "kv_scales.json"


class KVCalibrationError(CCRAExportError):
    """The decoder cannot be calibrated (non-finite keys/values, no prompt)."""


@dataclass(frozen=True)
class KVRanges:
    """Per layer and channel (``kv_heads * head_size``, head-major), the largest |key| (its rotary
    pair's norm) and |value| the decoder wrote over ``tokens`` calibration tokens."""

    keys: np.ndarray
    values: np.ndarray
    tokens: int

    def scales(self, scheme: str) -> dict[str, Any]:
        """The builder's scale file for ``scheme`` (int8_per_channel | int8_per_tensor)."""
        if scheme not in ("int8_per_channel", "int8_per_tensor"):
            raise KVCalibrationError(f"no calibration for the KV scheme {scheme!r}")
        keys = np.maximum(self.keys * HEADROOM, MIN_THRESHOLD)
        values = np.maximum(self.values * HEADROOM, MIN_THRESHOLD)
        if scheme == "int8_per_tensor":
            keys, values = keys.max(axis=1, keepdims=True), values.max(axis=1, keepdims=True)
        as_list = (lambda row: float(row[0])) if scheme == "int8_per_tensor" else (lambda row: row.tolist())
        return {
            "scales": {
                "k_scales": [as_list(row / QMAX) for row in keys.astype(np.float64)],
                "v_scales": [as_list(row / QMAX) for row in values.astype(np.float64)],
            },
            "qmax": QMAX,
            "layer_ids": list(range(len(keys))),
            "calibration": {
                "tokens": self.tokens,
                "threshold": f"{HEADROOM} x absmax (keys: of the rotary pair's norm)",
            },
        }


def pair_envelope(keys: np.ndarray, head_size: int) -> np.ndarray:
    """[..., heads, tokens, head_size] post-rotary keys -> the same shape holding, in both channels of
    each rotary pair (d, d + head_size/2), the pair's norm: what the channel can reach at any position
    (the builder writes the half-rotated layout, rotary_interleaved=0)."""
    half = head_size // 2
    norm = np.sqrt(keys[..., :half].astype(np.float64) ** 2 + keys[..., half:].astype(np.float64) ** 2)
    return np.concatenate([norm, norm], axis=-1)


def kv_ranges(lm: LanguageModel, prompts: Sequence[np.ndarray]) -> KVRanges:
    """Run ``lm`` (built without KV quantization) on each [1, S, D] prompt from an empty cache and
    take, per layer and channel, the largest key (pair norm) and value it writes. The decoder is
    run as a plain session (its past empty, its present returned), not through the runtime's
    in-place cache: calibration reads every key and value, which the in-place cache never copies out."""
    if not prompts:
        raise KVCalibrationError("no calibration prompt")
    if lm.head_size % 2:
        raise KVCalibrationError(f"a head size of {lm.head_size}: rotary pairs need an even one")
    inputs, outputs = lm.names
    present = [
        outputs[kind] % layer for kind in ("present_key_names", "present_value_names") for layer in range(lm.layers)
    ]
    empty = np.zeros((1, lm.kv_heads, 0, lm.head_size), lm.kv_dtype)
    past = {
        inputs[kind] % layer: empty for kind in ("past_key_names", "past_value_names") for layer in range(lm.layers)
    }
    channels = lm.kv_heads * lm.head_size
    keys = np.zeros((lm.layers, channels))
    values = np.zeros((lm.layers, channels))
    tokens = 0
    for prompt in prompts:
        count = prompt.shape[1]
        feeds = {
            inputs["inputs_embeds"]: np.ascontiguousarray(prompt, lm.embeds_dtype),
            inputs["attention_mask"]: np.ones((1, count), np.int64),
            **past,
        }
        written = lm.decoder.run(present, feeds)
        for layer in range(lm.layers):
            key = pair_envelope(written[layer][0], lm.head_size)  # [heads, tokens, head_size]
            value = np.abs(written[lm.layers + layer][0].astype(np.float64))
            keys[layer] = np.maximum(keys[layer], key.max(axis=1).reshape(channels))
            values[layer] = np.maximum(values[layer], value.max(axis=1).reshape(channels))
        tokens += count
    if not (np.isfinite(keys).all() and np.isfinite(values).all()):
        raise KVCalibrationError("the decoder wrote non-finite keys or values on the calibration prompts")
    return KVRanges(keys, values, tokens)


def write_scales(ranges: KVRanges, scheme: str, path: Path) -> Path:
    """The builder's ``kv_cache_scale_file`` for ``scheme`` at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ranges.scales(scheme), allow_nan=False))
    return path
