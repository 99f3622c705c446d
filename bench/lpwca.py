"""Fused LPWCA vs the portable decomposed graph vs PyTorch, on this CPU, in one run.

    python bench/lpwca.py                        # tiny and llava-1.5-7b, batch 1
    python bench/lpwca.py --presets llava-1.5-7b --batch 2 --json out/lpwca.json

Two tables:
1. The LPWCA stage alone (CCRA stages 2-3: V [B,L,N,Dv] and q -> F, A): the plain PyTorch
   reference, the C++ CPU kernel called directly, and ONNX Runtime running the stage's portable
   graph and its fused graph (one ccra::LPWCA node). The kernel's lower bound is reading V twice:
   the "GB/s" column is 2 * bytes(V) / time, next to this machine's measured copy bandwidth.
2. The whole vision graph (tower + CCRA + projector) in ONNX Runtime, portable vs fused, and
   PyTorch eager.
Ratios are PyTorch time / candidate time (above 1: faster than PyTorch). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table
from vision import median_ms

from ccra_export.core.config import preset
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.core.sample_inputs import random_inputs
from ccra_export.export.onnx_export import export_model_proto, save_model
from ccra_export.model.lpwca_fused import fold_query
from ccra_export.model.vision_model import build_model, input_names
from ccra_export.runtime.lpwca_cpu import lpwca_cpu
from ccra_export.runtime.vision_backend import OrtBackend


class LpwcaStage(torch.nn.Module):
    """CCRA stages 2-3 alone, for exporting the stage by itself."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.ccra = model.ccra
        self.config = model.config

    def forward(self, features: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stage = self.ccra.lpwca if self.ccra.lpwca_impl == "portable" else self.ccra.lpwca_fused
        return stage(features, q)


def export_stage(stage: LpwcaStage, features: torch.Tensor, q: torch.Tensor, mode: str, path: Path) -> Path:
    from ccra_export.export.lpwca_op import TRANSLATION_TABLE, lpwca_mode
    from ccra_export.export.onnx_export import _quiet_exporter

    with _quiet_exporter(), torch.no_grad(), lpwca_mode(stage, mode):
        program = torch.onnx.export(
            stage,
            (features, q),
            input_names=["features", "q"],
            output_names=["fused", "attention"],
            dynamo=True,
            opset_version=20,
            custom_translation_table=TRANSLATION_TABLE,
            verbose=False,
        )
    program.save(str(path))
    return path


def copy_bandwidth_gbs(megabytes: int = 512) -> float:
    """Measured read+write bandwidth of a large numpy copy (bytes moved / time)."""
    src = np.ones(megabytes * (1 << 20) // 4, np.float32)
    dst = np.empty_like(src)
    ms = median_ms(lambda: np.copyto(dst, src), repeats=5)
    return 2 * src.nbytes / ms / 1e6


def stage_rows(name: str, batch: int, work: Path, repeats: int) -> list[dict]:
    config = preset(name)
    model = build_model(config, seed=0)
    c = config.ccra
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(batch, c.num_layers, config.num_patches, config.vision.hidden_size, generator=gen)
    text = torch.randn(batch, 16, c.text_hidden_size, generator=gen)
    with torch.no_grad():
        q = model.ccra.text_query(text, torch.ones(batch, 16, dtype=torch.int64))
        want = model.ccra.lpwca(features, q)[0].numpy()
        weights, bias = fold_query(model.ccra, q)
    attrs = dict(
        num_heads=c.num_heads, epsilon=c.layer_norm_eps, head_scale=c.head_dim**-0.5, layer_scale=c.attn_dim**-0.5
    )
    stage = LpwcaStage(model)
    feeds = {"features": features.numpy(), "q": q.numpy()}
    candidates = {
        "PyTorch (plain reference)": lambda: model.ccra.lpwca(features, q)[0].numpy(),
        "C++ CPU kernel (direct)": lambda: lpwca_cpu(features.numpy(), weights.numpy(), bias.numpy(), **attrs)[0],
    }
    for mode in ("portable", "fused"):
        backend = OrtBackend(export_stage(stage, features, q, mode, work / f"{name}-stage-{mode}.onnx"))
        candidates[f"ORT {mode} stage graph"] = lambda backend=backend: backend.run(feeds)["fused"]
    v_bytes = features.numel() * 4
    rows = time_candidates(candidates, want, repeats, {"preset": name, "batch": batch})
    for row in rows:
        row.update(gbs_2v=2 * v_bytes / row["ms"] / 1e6, v_mb=v_bytes / 1e6)
    return rows


def time_candidates(candidates: dict, want: np.ndarray, repeats: int, labels: dict) -> list[dict]:
    """Median time and cosine vs ``want`` per candidate; the first candidate is the PyTorch baseline."""
    rows, base = [], None
    with torch.inference_mode():
        for label, fn in candidates.items():
            ms = median_ms(fn, repeats)
            base = base or ms
            cosine = compare_output("out", fn(), want, thresholds_for("fp32")).cosine
            rows.append({**labels, "candidate": label, "ms": ms, "vs_pytorch": base / ms, "cosine": cosine})
    return rows


def graph_rows(name: str, batch: int, work: Path, repeats: int) -> list[dict]:
    config = preset(name)
    model = build_model(config, seed=0)
    feeds = random_inputs(config, batch=batch, text_len=32, seed=0)
    args = [torch.from_numpy(feeds[n]) for n in input_names(config)]
    want = model(*args)[0].detach().numpy()
    candidates = {"PyTorch eager": lambda: model(*args)[0].numpy()}
    for mode in ("portable", "fused"):
        path = work / f"{name}-{mode}.onnx"
        save_model(export_model_proto(model, lpwca=mode), path, "auto")
        backend = OrtBackend(path)
        candidates[f"ORT, LPWCA {mode}"] = lambda backend=backend: backend.run(feeds)["visual_tokens"]
    return time_candidates(candidates, want, repeats, {"preset": name, "batch": batch})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,llava-1.5-7b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=0, help="timed runs (default: 30 tiny, 5 others)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    bandwidth = copy_bandwidth_gbs()
    console.print(
        f"{threads} threads, ONNX Runtime {ort.__version__}, torch {torch.__version__}; "
        f"measured copy bandwidth {bandwidth:.1f} GB/s"
    )
    stages, graphs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            repeats = args.repeats or (30 if name == "tiny" else 5)
            with console.status(f"{name}: LPWCA stage"):
                stages += stage_rows(name, args.batch, Path(tmp), repeats)
            with console.status(f"{name}: whole vision graph"):
                graphs += graph_rows(name, args.batch, Path(tmp), max(3, repeats // 2))

    table = Table(title=f"LPWCA stage alone (FP32, batch {args.batch})")
    for col in ("preset", "candidate", "ms", "PyTorch/x", "V MB", "2V GB/s", "% copy BW", "cosine"):
        table.add_column(col, justify="left" if col in ("preset", "candidate") else "right")
    for r in stages:
        table.add_row(
            r["preset"],
            r["candidate"],
            f"{r['ms']:.2f}",
            f"{r['vs_pytorch']:.2f}x",
            f"{r['v_mb']:.1f}",
            f"{r['gbs_2v']:.2f}",
            f"{100 * r['gbs_2v'] / bandwidth:.0f}%",
            f"{r['cosine']:.7f}",
        )
    console.print(table)
    table = Table(title=f"Whole vision graph (FP32, batch {args.batch})")
    for col in ("preset", "candidate", "ms", "PyTorch/x", "cosine"):
        table.add_column(col, justify="left" if col in ("preset", "candidate") else "right")
    for r in graphs:
        table.add_row(r["preset"], r["candidate"], f"{r['ms']:.1f}", f"{r['vs_pytorch']:.2f}x", f"{r['cosine']:.7f}")
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"copy_bandwidth_gbs": bandwidth, "stage": stages, "graph": graphs}, indent=2))


if __name__ == "__main__":
    main()
