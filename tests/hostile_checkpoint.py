"""A quantization-hostile copy of a checkpoint: the same FP32 function, weights INT4 cannot keep.

Outlier channels are folded into the language model's layers: for a few hidden channels ``c``,
a layer's RMSNorm weight is divided by ``scale`` and the columns ``c`` of the projections it feeds
multiplied by it. In FP32 the product is unchanged (up to rounding), but round-to-nearest INT4
shares one scale per block of 32 input channels, so the blown-up column takes the whole range of
its block and the other 31 weights of every row round to a level or two. This is how real models
hide outliers (the SmoothQuant / LLM.int8() observation) and why weight-only INT4 needs care.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: (RMSNorm, the projections it feeds) in each decoder layer
_FOLDS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


def make_hostile(checkpoint: Path, out: Path, *, channels: int = 8, scale: float = 64.0) -> Path:
    """Copy ``checkpoint`` to ``out`` with outlier channels folded into every language-model layer."""
    shutil.copytree(checkpoint, out)
    weights = load_file(str(out / "model.safetensors"))
    prefix = "language_model.model.layers."
    layers = sorted({int(k[len(prefix) :].split(".")[0]) for k in weights if k.startswith(prefix)})
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        base = f"{prefix}{layer}."
        for norm, projections in _FOLDS:
            width = weights[base + norm + ".weight"].shape[0]
            picked = torch.randperm(width, generator=generator)[:channels]
            weights[base + norm + ".weight"][picked] /= scale
            for projection in projections:
                weights[base + projection + ".weight"][:, picked] *= scale
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
