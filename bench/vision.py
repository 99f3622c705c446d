"""Vision graph latency: ONNX Runtime vs PyTorch eager, same inputs, same run, same threads.

    python bench/vision.py                      # tiny and llava-1.5-7b, batch 1 and 4, FP32
    python bench/vision.py --presets tiny --batches 1,8 --json out/bench.json

Prints per case the median latency of each, the ratio (PyTorch / ONNX Runtime: above 1 means
ONNX Runtime is faster) with its spread over the runs (the two are timed alternately, so a
noisy neighbour hits both), the achieved GFLOP/s from the analytic FLOP count, and each as a
share of its own library's FP32 GEMM peak measured on the same cores in the same run (ONNX
Runtime's MLAS for the graph, torch's BLAS for eager: MKL runs at about half speed on AMD CPUs,
so one peak for both would put the graph above 100%). The cosine between the two
outputs is printed too: a speed figure for a graph that computes something else is worthless.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from flops import measured_gemm_peak, measured_ort_gemm_peak, vision_graph_flops
from rich.console import Console
from rich.table import Table

from ccra_export.core.config import preset
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.core.sample_inputs import random_inputs
from ccra_export.export.onnx_export import export_model_proto, save_model
from ccra_export.model.vision_model import build_model, input_names, output_names


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_ms(fn) for _ in range(repeats))


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def paired_ms(first, second, repeats: int, warmup: int = 1) -> tuple[list[float], list[float]]:
    """Each run of ``first`` followed by one of ``second``: their times, in milliseconds."""
    for _ in range(warmup):
        first(), second()
    pairs = [(_ms(first), _ms(second)) for _ in range(repeats)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def bench_preset(name: str, batches: list[int], text_len: int, repeats: int, threads: int, work: Path) -> list[dict]:
    config = preset(name)
    model = build_model(config, seed=0)
    path = work / f"{name}.onnx"
    save_model(export_model_proto(model), path, "auto")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    rows = []
    for batch in batches:
        feeds = random_inputs(config, batch=batch, text_len=text_len, seed=batch)
        args = [torch.from_numpy(feeds[n]) for n in input_names(config)]

        def run_torch(args=args):
            with torch.inference_mode():
                return model(*args)

        def run_ort(feeds=feeds):
            return session.run(None, feeds)

        torch_times, ort_times = paired_ms(run_torch, run_ort, repeats)
        torch_ms, ort_ms = statistics.median(torch_times), statistics.median(ort_times)
        ratios = [t / o for t, o in zip(torch_times, ort_times, strict=True)]
        want = run_torch()
        want = (want if isinstance(want, tuple) else (want,))[0].numpy()
        cosine = compare_output(output_names(model)[0], run_ort()[0], want, thresholds_for("fp32")).cosine
        gflop = vision_graph_flops(config, batch, text_len) / 1e9
        rows.append(
            {
                "preset": name,
                "batch": batch,
                "text_len": text_len,
                "gflop": gflop,
                "torch_ms": torch_ms,
                "ort_ms": ort_ms,
                "torch_over_ort": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "torch_gflops": gflop / torch_ms * 1e3,
                "ort_gflops": gflop / ort_ms * 1e3,
                "cosine": cosine,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,llava-1.5-7b")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per case (default: 30 tiny, 3 others)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--peak-s", type=float, default=2.0, help="seconds each GEMM peak is measured")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    with console.status("Measuring the FP32 GEMM peaks (torch, ONNX Runtime)"):
        peak = {
            "torch": measured_gemm_peak(seconds=args.peak_s),
            "ort": measured_ort_gemm_peak(args.threads, seconds=args.peak_s),
        }
    console.print(
        f"{args.threads} threads; torch {torch.__version__}; ONNX Runtime {ort.__version__}; "
        f"FP32 GEMM peak: torch {peak['torch']:.1f} GFLOP/s, ONNX Runtime {peak['ort']:.1f} GFLOP/s"
    )
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.presets.split(","):
            repeats = args.repeats or (30 if name == "tiny" else 3)
            with console.status(f"Exporting and timing {name}"):
                rows += bench_preset(
                    name, [int(b) for b in args.batches.split(",")], args.text_len, repeats, args.threads, Path(work)
                )

    table = Table(title="Vision graph (tower + CCRA + projector), FP32, CPU")
    for column in (
        "preset",
        "batch",
        "GFLOP",
        "PyTorch ms",
        "ORT ms",
        "PyTorch/ORT (min-max)",
        "PyTorch % peak",
        "ORT GFLOP/s",
        "ORT % peak",
        "cosine",
    ):
        table.add_column(column, justify="left" if column == "preset" else "right")
    for r in rows:
        table.add_row(
            r["preset"],
            str(r["batch"]),
            f"{r['gflop']:.2f}",
            f"{r['torch_ms']:.1f}",
            f"{r['ort_ms']:.1f}",
            f"{r['torch_over_ort']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
            f"{100 * r['torch_gflops'] / peak['torch']:.0f}%",
            f"{r['ort_gflops']:.1f}",
            f"{100 * r['ort_gflops'] / peak['ort']:.0f}%",
            f"{r['cosine']:.7f}",
        )
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gemm_peak_gflops": peak, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
