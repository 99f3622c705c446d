"""Draws docs/explain_example.png, the README's picture of `ccra-export explain`: the demo model's
real LPWCA map for a real question.

    python docs/explain_example.py [--out PATH]

The shipped demo checkpoint (``--model demo``), through its PyTorch reference, on the example
picture ``shapes_7_00003.png`` (a blue square, circle and triangle) asked "What color is the
circle?"; the overlay is the one `explain` draws, with the asked shape's box reported beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from ccra_export.core.image_preprocess import crop_geometry
from ccra_export.demo import CHECKPOINT, EXAMPLES
from ccra_export.model.reference_vlm import ReferenceVLM
from ccra_export.runtime.attention import AttentionMap
from ccra_export.workflows.explain import overlay

OUT = Path(__file__).with_name("explain_example.png")
PICTURE, QUESTION = "shapes_7_00003.png", "What color is the circle?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write the picture (default {OUT.name})")
    out = parser.parse_args().out
    lines = [json.loads(line) for line in (EXAMPLES / "questions.jsonl").read_text().splitlines()]
    box = tuple(next(x["box"] for x in lines if x["image"] == PICTURE and x["question"] == QUESTION))
    reference = ReferenceVLM.from_checkpoint(CHECKPOINT)
    photo = Image.open(EXAMPLES / PICTURE).convert("RGB")
    answer = reference.answer(photo, QUESTION)
    layers = reference.vision.config.ccra.feature_layers
    amap = AttentionMap.from_output(answer.attention, layers, crop_geometry(photo.size, reference.processor))
    overlay(photo, amap, top_k=5).save(out, optimize=True)
    ratio = amap.share_in_box(box) / amap.box_share(box)
    print(f"{out}: {QUESTION!r} -> {answer.text!r}; the circle's box holds {ratio:.1f}x its share of the picture")


if __name__ == "__main__":
    main()
