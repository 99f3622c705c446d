"""The language model's weight-only recipes, measured side by side: which one `--lm-quant` defaults to.

    python bench/lm_quant.py                                  # the demo, INT4, rtn / k_quant / k_quant_mixed
    python bench/lm_quant.py --model mid --questions 0        # a 0.5B-class random Llama: speed and size only
    python bench/lm_quant.py --model small --recipes rtn --questions 0 --steps 4 --repeats 1   # a smoke run

Per recipe, one bundle (FP32 vision, the decoder at --precision) built by `ccra-export build`, then:
its teacher-forced next-token figures against Hugging Face FP32 (KL mean / p99, top-1 where the
reference is sure: the build's language-model parity), the demo's answers on --questions held-out
questions against the truth and against PyTorch FP32 (`ccra-export eval`: accuracy, flips), decode
speed (median ms per token over --steps tokens, --repeats runs, each run timing every recipe in turn
so a noisy neighbour hits all of them; reported as a ratio to the first recipe with its spread),
and the decoder's bytes on disk. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def build(checkpoint: str, out: Path, precision: str, recipe: str, block_size: int) -> dict:
    """The bundle (kept when it exists) and its language-model parity figures."""
    from ccra_export.export.lm_export import LMQuant
    from ccra_export.workflows.build import BuildOptions, build_bundle

    if not (out / "manifest.json").exists():
        options = BuildOptions(
            model=checkpoint,
            output=out,
            precision="fp32",
            lm_precision=precision,
            lm_device="cpu",
            lm_quant=LMQuant(recipe=recipe, block_size=block_size),
        )
        build_bundle(options)
    return json.loads((out / "parity.json").read_text())["language_model"]


def decode_ms(bundle: Path, steps: int) -> float:
    """Milliseconds per decoded token after a 64-token prompt (greedy, no stop)."""
    from ccra_export.runtime.language_model import LanguageModel, Sampling

    lm = LanguageModel(bundle / "lm", "cpu")
    prompt = lm.embed(np.arange(3, 67) % 300)
    lm.generate(prompt, Sampling(max_new_tokens=2))  # warm-up
    generation = lm.generate(prompt, Sampling(max_new_tokens=steps))
    return 1e3 * generation.decode_s / max(len(generation.tokens) - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="demo, a checkpoint directory, or a random size: mid | small")
    parser.add_argument("--precision", choices=("int4", "int8"), default="int4")
    parser.add_argument("--recipes", default="rtn,k_quant,k_quant_mixed")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--questions", type=int, default=200, help="held-out demo questions for eval (0: none)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("out/bench-lm-quant"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

    checkpoint = args.model
    if args.model in ("mid", "small"):
        from lm_decode import make_checkpoint

        checkpoint = str(args.work / f"checkpoint-{args.model}")
        if not (Path(checkpoint) / "config.json").exists():
            with console.status(f"Writing the {args.model} random checkpoint"):
                make_checkpoint(Path(checkpoint), args.model)
    rows = {}
    for recipe in recipes:
        bundle = args.work / f"{Path(args.model).name}-{args.precision}-{recipe}-b{args.block_size}"
        with console.status(f"Building {bundle.name} (minutes)"):
            figures = build(checkpoint, bundle, args.precision, recipe, args.block_size)
        decoder = bundle / "lm" / "decoder"
        rows[recipe] = {
            "bundle": str(bundle),
            "next_token": figures["next_token"],
            "decoder_bytes": sum(p.stat().st_size for p in decoder.rglob("*") if p.is_file()),
            "ms_per_token": [],
        }
        if args.questions:
            from ccra_export.core import shapes
            from ccra_export.workflows.evaluate import evaluate

            data = shapes.write_dataset(args.work / "held-out", images=(args.questions + 1) // 2, seed=4242)
            with console.status(f"Answering {args.questions} held-out questions"):
                report = evaluate(bundle, data, limit=args.questions)
            rows[recipe]["accuracy"] = report.accuracy("ours")
            rows[recipe]["reference_accuracy"] = report.accuracy("reference")
            rows[recipe]["flip_rate"] = report.flip_rate
    with console.status("Timing decode, every recipe in each round"):
        for _ in range(args.repeats):
            for recipe in recipes:
                rows[recipe]["ms_per_token"].append(decode_ms(Path(rows[recipe]["bundle"]), args.steps))
    first = rows[recipes[0]]["ms_per_token"]
    table = Table(
        title=f"{args.model}, {args.precision} decoder, block {args.block_size}: recipes vs {recipes[0]} "
        f"(decode: median (min-max) of {args.repeats}, {args.steps} tokens)",
        title_justify="left",
    )
    columns = ("recipe", "KL mean", "KL p99", "top-1 (sure)", "accuracy", "flips vs PyTorch", "ms/token", "speed ratio")
    for column in (*columns, "decoder MB"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for recipe in recipes:
        row, forced = rows[recipe], rows[recipe]["next_token"]
        ratios = [a / b for a, b in zip(first, row["ms_per_token"], strict=True)]
        row["speed_ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        sure = forced.get("confident_top1_agreement")
        table.add_row(
            recipe,
            f"{forced['kl_mean']:.2e}",
            f"{forced['kl_p99']:.2e}",
            "n/a" if sure is None else f"{sure:.3f}",
            "" if "accuracy" not in row else f"{100 * row['accuracy']:.1f}%",
            "" if "flip_rate" not in row else f"{100 * row['flip_rate']:.1f}%",
            f"{statistics.median(row['ms_per_token']):.2f}",
            f"{row['speed_ratio']['median']:.2f}x ({row['speed_ratio']['min']:.2f}-{row['speed_ratio']['max']:.2f})",
            f"{row['decoder_bytes'] / 1e6:.1f}",
        )
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "precision": args.precision, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
