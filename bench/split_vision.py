"""Split vision at llava-1.5-7b sizes: question 2 about an image vs question 1, same bundle, same run.

    python bench/split_vision.py                  # FP32 on the CPU, 5 timed rounds
    python bench/split_vision.py --repeats 10 --work /tmp/sv --json out/split_vision.json
    python bench/split_vision.py --lpwca fused    # the head with the ccra::LPWCA node

Builds (once, in --work) a checkpoint with random weights whose vision side is llava-1.5-7b's
real size (CLIP ViT-L/14 at 336 px, CCRA over layers 1..23, 576 visual tokens of width 4096) and
whose language model is one Llama layer of Vicuna-7B's width (a real 7B decoder does not fit this
machine's time; its prefill is the same for both questions, so it moves both TTFTs by the same
amount and the vision saving below carries over as milliseconds). Then builds a `--split-vision`
FP32 bundle from it and times, per round (one warm-up round first):

- vision, question 1: a new image (the cache cleared): tower + CCRA's head;
- vision, question 2: the same image again: the tower's output from the cache, the head alone;
- time to first token of each (preprocessing + vision + prefill + first token);
- the single vision graph of the same weights (vision.onnx), the reference a split must not slow.

Reports medians with (min–max), the ratios, and the cache's memory per image. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.conftest: the in-process checkpoint helpers


def make_checkpoint(path: Path, name: str = "llava-1.5-7b") -> None:
    """The preset's vision side and CCRA (llava-1.5-7b's by default), a one-layer language model of
    its width, random weights."""
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from ccra_export.core.config import preset
    from ccra_export.model.checkpoint import save_ccra_weights
    from ccra_export.model.vision_model import build_model, hf_vision_config
    from tests.conftest import save_tokenizer

    config = preset(name)
    wide = config.lm_hidden_size >= 4096
    text = LlamaConfig(
        hidden_size=config.lm_hidden_size,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=32 if wide else config.lm_hidden_size // 16,  # ORT's CPU GQA: head size 16k
        num_key_value_heads=8 if wide else 2,
        vocab_size=128,
    )
    llava_config = LlavaConfig(
        vision_config=hf_vision_config(config),
        text_config=text,
        image_token_index=127,
        image_seq_length=config.num_patches,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(llava_config).eval().save_pretrained(path)
    save_tokenizer(path)
    save_ccra_weights(build_model(config, seed=7), path)


def build(checkpoint: Path, out: Path, lpwca: str) -> None:
    from ccra_export.core.console import Steps
    from ccra_export.workflows.build import BuildOptions, ParityOptions, build_bundle

    options = BuildOptions(
        model=str(checkpoint),
        output=out,
        precision="fp32",
        backend="ort",
        split_vision=True,
        lpwca=lpwca,
        lm_precision="fp32",
        force=True,
        parity=ParityOptions(batch=1, text_len=24),
    )
    result = build_bundle(options, Steps(None))
    if not result.report.passed:
        raise SystemExit(f"parity failed: {result.report.failure_summary()}")


def single_graph_ms(checkpoint: Path, bundle: Path, repeats: int) -> tuple[list[float], float]:
    """The same weights as one vision.onnx on ONNX Runtime: latency per round, and the cosine of its
    visual tokens against the split bundle's on the recorded parity inputs."""
    import tempfile

    from ccra_export.core.manifest import read_manifest
    from ccra_export.core.parity import compare_output, thresholds_for
    from ccra_export.core.reference_record import load_reference
    from ccra_export.export.onnx_export import export_model_proto, save_model
    from ccra_export.runtime.backends import bundle_backend
    from ccra_export.runtime.vision_backend import OrtBackend
    from ccra_export.workflows.source import resolve_source

    source = resolve_source(str(checkpoint), random_weights=False, seed=0, plain=False)
    feeds, _ = load_reference(bundle / "reference.npz")
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "vision.onnx"
        save_model(export_model_proto(source.model), path)
        single = OrtBackend(path)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            outputs = single.run(feeds)
            times.append(time.perf_counter() - start)
    split, _ = bundle_backend(bundle, read_manifest(bundle), "ort")
    split_tokens = split.run(feeds)["visual_tokens"]
    agreement = compare_output("visual_tokens", split_tokens, outputs["visual_tokens"], thresholds_for("fp32"))
    return times[1:], agreement.cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="llava-1.5-7b", help="the vision side's sizes (tiny: a smoke run)")
    parser.add_argument("--work", type=Path, default=Path("out/bench-split-vision"))
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--lpwca",
        choices=("portable", "fused"),
        default="portable",
        help="the head's LPWCA: standard ops (what auto picks for ONNX Runtime) or the ccra::LPWCA node (C++ CPU "
        "kernel on folded queries)",
    )
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from ccra_export.workflows.bench import Spread, run_bench

    console = Console()
    checkpoint = args.work / f"checkpoint-{args.preset}"
    bundle = args.work / f"bundle-{args.preset}-{args.lpwca}"
    if not (checkpoint / "ccra.safetensors").exists():
        with console.status(f"Writing the {args.preset}-size checkpoint"):
            make_checkpoint(checkpoint, args.preset)
    if not (bundle / "manifest.json").exists():
        with console.status("Building the --split-vision bundle (minutes)"):
            build(checkpoint, bundle, args.lpwca)
    with console.status(f"Timing {args.repeats} rounds of question 1 and question 2"):
        ours = run_bench(bundle, None, 8, args.repeats, "ort").figures[0]
    with console.status("Timing the single vision graph of the same weights"):
        single, cosine = single_graph_ms(checkpoint, bundle, args.repeats)
    single_ms = Spread.of(single, 1e3)

    def fmt(s: Spread, digits: int = 0, suffix: str = "") -> str:
        return f"{s.median:.{digits}f}{suffix} ({s.low:.{digits}f}–{s.high:.{digits}f})"

    title = (
        f"{args.preset} vision sizes, FP32, LPWCA {args.lpwca}, ONNX Runtime CPU; median (min–max) of {args.repeats}"
    )
    table = Table(title=title)
    for column in ("", "vision ms", "first token ms"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("question 1 (new image: tower + head)", fmt(ours.vision_ms), fmt(ours.first_token_ms))
    table.add_row(
        "question 2 (same image: head, tower cached)", fmt(ours.vision_cached_ms), fmt(ours.first_token_cached_ms)
    )
    table.add_row("single vision.onnx, same weights", fmt(single_ms), "")
    table.add_row(
        "ratio question 1 / question 2",
        fmt(ours.vision_ms.over(ours.vision_cached_ms), 1, "x"),
        fmt(ours.first_token_ms.over(ours.first_token_cached_ms), 2, "x"),
    )
    table.add_row("ratio single graph / question 1", fmt(single_ms.over(ours.vision_ms), 2, "x"), "")
    console.print(table)
    stats = ours.tower_cache
    per_image = stats["bytes"] / max(stats["entries"], 1)
    console.print(
        f"tower cache: {per_image / 2**20:.1f} MiB per image (FP32; FP16 bundles hold half), "
        f"{stats['hits']} hits / {stats['misses']} misses; split vs single graph cosine {cosine:.7f}"
    )
    if args.json:
        figures = {
            "vision_q1_ms": ours.vision_ms.__dict__,
            "vision_q2_ms": ours.vision_cached_ms.__dict__,
            "first_token_q1_ms": ours.first_token_ms.__dict__,
            "first_token_q2_ms": ours.first_token_cached_ms.__dict__,
            "single_graph_ms": single_ms.__dict__,
            "cache_bytes_per_image": per_image,
            "split_vs_single_cosine": cosine,
            "lpwca": args.lpwca,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
