"""The demo model's figures (its model card's tables): accuracy per template for PyTorch FP32, and
for each bundle precision the accuracy and the answer flips against PyTorch, on held-out questions.

    python docs/demo_figures.py --images 500 --work out/figures             # the model card's grid
    python docs/demo_figures.py --images 10 --vision fp32 --lm fp32          # one cell, quickly

Held-out questions: ``core.shapes`` with seed 4242 (training drew from seed 0, its evaluation from
1000), two distinct questions per picture. Localisation: for `What color is the {shape}?`, the
share of the LPWCA map inside the asked shape's box over the box's share of the picture, through
``runtime.attention.AttentionMap`` (the product's geometry, padding included): the fraction of
questions where it is at least 3x, and the median ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from ccra_export.cli import main as cli
from ccra_export.core import shapes
from ccra_export.core.image_preprocess import crop_geometry
from ccra_export.demo import CHECKPOINT
from ccra_export.model.reference_vlm import ReferenceVLM
from ccra_export.runtime.attention import AttentionMap
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline

SEED = 4242


def per_template(items, answers) -> dict[str, float]:  # noqa: ANN001
    scores = {
        t: [a == q.answer for a, (_, q) in zip(answers, items, strict=True) if q.template == t]
        for t in shapes.TEMPLATES
    }
    return {
        "all": float(np.mean([a == q.answer for a, (_, q) in zip(answers, items, strict=True)])),
        **{t: float(np.mean(v)) for t, v in scores.items()},
    }


def localisation(items, maps, processor) -> tuple[float, float, int]:  # noqa: ANN001
    layers = None
    ratios = []
    for (scene, question), attention in zip(items, maps, strict=True):
        if question.template != "color":
            continue
        layers = layers or (1,) * attention.shape[0]
        amap = AttentionMap.from_output(attention, layers, crop_geometry((scene.side, scene.side), processor))
        ratios.append(amap.share_in_box(question.box) / amap.box_share(question.box))
    ratios = np.asarray(ratios)
    return float(np.mean(ratios >= 3.0)), float(np.median(ratios)), len(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="held-out pictures (two questions each)")
    parser.add_argument("--vision", default="fp32,fp16,int8", help="vision precisions (comma-separated)")
    parser.add_argument("--lm", default="fp32,int8,int4", help="language-model precisions (comma-separated)")
    parser.add_argument("--work", type=Path, default=Path("out/figures"), help="where the bundles are built")
    args = parser.parse_args()
    items = shapes.held_out(args.images, SEED)
    pictures = [shapes.render(scene) for scene, _ in items]
    reference = ReferenceVLM.from_checkpoint(CHECKPOINT)
    start = time.perf_counter()
    theirs = [reference.answer(p, q.question) for p, (_, q) in zip(pictures, items, strict=True)]
    seconds = (time.perf_counter() - start) / len(items)
    want = [a.text.strip() for a in theirs]
    accuracy = per_template(items, want)
    located, median, count = localisation(items, [a.attention for a in theirs], reference.processor)
    print(f"{len(items)} held-out questions (seed {SEED}); PyTorch FP32 {seconds * 1000:.0f} ms a question")
    print("| PyTorch FP32 | all | " + " | ".join(shapes.TEMPLATES) + " |")
    print("| accuracy | " + " | ".join(f"{accuracy[k]:.3f}" for k in ["all", *shapes.TEMPLATES]) + " |")
    print(f"localisation ({count} colour questions): {located:.3f} at >= 3x the box's share, median {median:.2f}x")
    print("| vision | language model | accuracy | flips vs PyTorch | localised >= 3x |")
    print("|---|---|---|---|---|")
    for vision in args.vision.split(","):
        for lm in args.lm.split(","):
            bundle = args.work / f"{vision}-{lm}"
            command = [
                "build",
                "--model",
                "demo",
                "--precision",
                vision,
                "--lm-precision",
                lm,
                "-o",
                str(bundle),
                "--force",
            ]
            result = CliRunner().invoke(cli, command)
            if result.exit_code != 0:
                last = result.output.strip().splitlines()[-1]
                print(f"| {vision} | {lm} | build failed (exit {result.exit_code}): {last} |")
                continue
            pipeline = Pipeline.from_bundle(bundle)
            ours, maps = [], []
            for picture, (_, question) in zip(pictures, items, strict=True):
                text, _, prepared = pipeline.generate_tokens(
                    picture, question.question, Sampling(max_new_tokens=4, stop_ids=pipeline.lm.eos_ids)
                )
                ours.append(text.strip())
                maps.append(prepared.attention[0])
            flips = np.mean([a != b for a, b in zip(ours, want, strict=True)])
            ours_located, _, _ = localisation(items, maps, reference.processor)
            print(
                f"| {vision} | {lm} | {per_template(items, ours)['all']:.3f} | {flips:.3f} | {ours_located:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
