"""INT8 (Q/DQ) vs FP32 vision graph in ONNX Runtime on this CPU, same run, with the cosine.

    python bench/int8.py                              # tiny and llava-1.5-7b, minmax calibration
    python bench/int8.py --presets tiny --method entropy --json out/int8.json

Calibrates on scikit-image's bundled photos, keeps two of them out for parity, and times both
graphs on the held-out batch. Each INT8 row carries its cosine against the FP32 PyTorch reference.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import skimage.data
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from vision import median_ms

from ccra_export.calibration.images import load_calibration_set
from ccra_export.calibration.quantize import quantize_int8
from ccra_export.calibration.reader import ImageBatchReader, make_feeds
from ccra_export.calibration.text import TextEmbedder
from ccra_export.core.config import preset
from ccra_export.core.image_preprocess import ImageProcessorConfig
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.export.onnx_export import export_model_proto, save_model
from ccra_export.model.vision_model import build_model, reference_outputs
from ccra_export.runtime.vision_backend import OrtBackend

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "cat",
    "immunohistochemistry",
    "camera",
    "retina",
    "hubble_deep_field",
)


def bench(name: str, method: str, photos: Path, work: Path, repeats: int) -> list[dict]:
    config = preset(name)
    model = build_model(config, seed=0)
    fp32 = work / f"{name}-fp32.onnx"
    save_model(export_model_proto(model), fp32, "auto")
    data = load_calibration_set(photos, holdout=2)
    processor = ImageProcessorConfig.for_image_size(config.vision.image_size)
    embedder = TextEmbedder.seeded(config.text_hidden_size)
    start = time.perf_counter()
    reader = ImageBatchReader(data.calibration, processor, embedder, 1)
    quantize_int8(fp32, work / f"{name}-int8.onnx", reader, method=method, ort_cache=work / f"{name}.json")
    calibration_s = time.perf_counter() - start
    feeds = make_feeds(data.held_out, processor, embedder)
    want = reference_outputs(model, feeds)["visual_tokens"]
    rows = []
    for precision, path in (("fp32", fp32), ("int8", work / f"{name}-int8.onnx")):
        backend = OrtBackend(path)
        ms = median_ms(lambda backend=backend: backend.run(feeds), repeats)
        got = backend.run(feeds)["visual_tokens"]
        cosine = compare_output("v", got, want, thresholds_for(precision)).cosine
        rows.append(
            {
                "preset": name,
                "precision": precision,
                "batch": len(data.held_out),
                "ms": ms,
                "cosine": cosine,
                "calibration_s": calibration_s if precision == "int8" else None,
                "file_mb": sum(p.stat().st_size for p in work.glob(f"{path.name}*")) / 1e6,
            }
        )
    rows[1]["fp32_over_int8"] = rows[0]["ms"] / rows[1]["ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,llava-1.5-7b")
    parser.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    parser.add_argument("--repeats", type=int, default=0, help="timed runs (default: 20 tiny, 3 others)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    console.print(f"ONNX Runtime {ort.__version__}, {len(os.sched_getaffinity(0))} threads, calibration {args.method}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for i, name in enumerate(PHOTOS):
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(photos / f"{i:02d}-{name}.jpg")
        for name in args.presets.split(","):
            with console.status(f"{name}: export, calibrate, time"):
                rows += bench(name, args.method, photos, Path(tmp), args.repeats or (20 if name == "tiny" else 3))
    table = Table(title="Vision graph, ONNX Runtime CPU, held-out images")
    for column in ("preset", "precision", "batch", "ms", "FP32/INT8", "cosine vs PyTorch", "graph MB", "calibration s"):
        table.add_column(column, justify="left" if column in ("preset", "precision") else "right")
    for r in rows:
        table.add_row(
            r["preset"],
            r["precision"],
            str(r["batch"]),
            f"{r['ms']:.1f}",
            f"{r['fp32_over_int8']:.2f}x" if "fp32_over_int8" in r else "",
            f"{r['cosine']:.6f}",
            f"{r['file_mb']:.1f}",
            f"{r['calibration_s']:.1f}" if r["calibration_s"] else "",
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
