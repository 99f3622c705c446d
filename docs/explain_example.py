"""Draws docs/explain_example.png, the README's example of `ccra-export explain`'s overlay.

    python docs/explain_example.py

A CCRA model at LLaVA-1.5's geometry (336 px crop, 14 px patches: a 24x24 grid; small widths so it
runs in seconds) with seeded random weights, its text query sharpened (x20) so the map is peaked,
reads scikit-image's astronaut photo cropped to 512x300 and centre-cropped (--no-pad-to-square: with
LLaVA's padding, this random model puts most of its attention on the uniform padding, which has no
pixels in the photo; attention.json's share_outside_image reports that share).
Random weights: the picture shows how a map is put on the photo, not what a trained CCRA attends to.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from ccra_export.core.config import preset
from ccra_export.core.image_preprocess import ImageProcessorConfig, crop_geometry, preprocess
from ccra_export.model.vision_model import build_model, reference_outputs
from ccra_export.runtime.attention import AttentionMap
from ccra_export.workflows.explain import overlay

OUT = Path(__file__).with_name("explain_example.png")


def main() -> None:
    tiny = preset("tiny")
    config = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, image_size=336))
    model = build_model(config, seed=3)
    with torch.no_grad():
        model.ccra.query.weight.mul_(20.0)  # a sharp query: a peaked map, as a trained one can be
    photo = Image.fromarray(skimage.data.astronaut()).crop((0, 0, 512, 300))
    processor = ImageProcessorConfig.for_image_size(336, pad_to_square=False)
    rng = np.random.default_rng(0)
    feeds = {
        "pixel_values": preprocess(photo, processor)[None],
        "text_embeds": rng.standard_normal((1, 8, config.text_hidden_size)).astype(np.float32),
        "text_mask": np.ones((1, 8), np.int64),
    }
    attention = reference_outputs(model, feeds)["lpwca_attention"][0]
    amap = AttentionMap.from_output(attention, config.ccra.feature_layers, crop_geometry(photo.size, processor))
    overlay(photo, amap, top_k=5).save(OUT, optimize=True)
    print(
        f"{OUT}: {photo.size[0]}x{photo.size[1]}, grid {amap.grid}, entropy {amap.summary()['entropy_normalised']:.3f}"
    )


if __name__ == "__main__":
    main()
