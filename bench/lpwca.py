"""Fused LPWCA vs the portable decomposed graph vs PyTorch, on this CPU (or the CUDA kernel on a
GPU), in one run.

    python bench/lpwca.py                        # tiny and llava-1.5-7b, batch 1
    python bench/lpwca.py --presets llava-1.5-7b --batch 2 --json out/lpwca.json
    python bench/lpwca.py --device cuda          # GPU only: the CUDA kernel vs PyTorch on the GPU

On a GPU (``--device cuda``, llava-1.5-7b by default) one table: the LPWCA stage's CUDA kernel
(its C ABI, queued as TensorRT's enqueue runs it: the caller's workspace, no synchronisation)
against the plain decomposed PyTorch reference on the same GPU, FP32 and FP16 features, timed
with CUDA events; ratio PyTorch / kernel (the target is >= 3x). The kernel library is
CCRA_LPWCA_CUDA_LIBRARY, else built with CMake for this GPU's architecture.

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
import ctypes
import json
import os
import statistics
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


def reference_inputs(name: str, batch: int) -> tuple:
    """``preset(name)``'s CCRA model (seed 0) with random stacked features and a text query for
    ``batch`` images: (config, model, features, q, PyTorch's fused output, folded weights, bias)."""
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
    return config, model, features, q, want, weights, bias


def stage_rows(name: str, batch: int, work: Path, repeats: int) -> list[dict]:
    config, model, features, q, want, weights, bias = reference_inputs(name, batch)
    c = config.ccra
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


def cuda_library(work: Path) -> ctypes.CDLL:
    """The CUDA kernels' C ABI: CCRA_LPWCA_CUDA_LIBRARY, else built for this GPU's architecture."""
    from ccra_export.workflows.plugins import NativeBuildError, build_cuda_kernel_library

    path = os.environ.get("CCRA_LPWCA_CUDA_LIBRARY")
    if not path:
        major, minor = torch.cuda.get_device_capability()
        try:
            path = str(build_cuda_kernel_library(work / "cuda-build", f"{major}{minor}"))
        except NativeBuildError as exc:
            sys.exit(f"{exc}\n{exc.log_tail}")
    lib = ctypes.CDLL(path)
    lib.ccra_lpwca_cuda_enqueue.restype = ctypes.c_int
    lib.ccra_lpwca_cuda_workspace_bytes.restype = ctypes.c_size_t
    return lib


def cuda_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median GPU time of ``fn`` (CUDA events on the current stream), in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def cuda_rows(name: str, batch: int, repeats: int, lib: ctypes.CDLL) -> list[dict]:
    """The CUDA kernel against the decomposed PyTorch reference, both on this GPU, FP32 and FP16."""
    config, model, features, q, want, weights, bias = reference_inputs(name, batch)
    c = config.ccra
    weights, bias = weights.cuda(), bias.cuda()
    ccra = model.ccra.cuda()
    heads, eps = c.num_heads, c.layer_norm_eps
    dims = (ctypes.c_longlong * 4)(*features.shape)
    wdims, bdims = (ctypes.c_longlong * 3)(*weights.shape), (ctypes.c_longlong * 3)(*bias.shape)
    workspace = torch.empty(lib.ccra_lpwca_cuda_workspace_bytes(dims, heads), dtype=torch.uint8, device="cuda")
    error = ctypes.create_string_buffer(512)
    rows = []
    for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        v, qd = features.to("cuda", dtype), q.to("cuda", dtype)
        fused = torch.empty(batch, config.num_patches, config.vision.hidden_size, device="cuda", dtype=dtype)
        attention = torch.empty(batch, c.num_layers, config.num_patches, device="cuda", dtype=torch.float32)

        def kernel(v=v, fused=fused, attention=attention, dtype=dtype) -> torch.Tensor:
            status = lib.ccra_lpwca_cuda_enqueue(
                ctypes.c_int(1 if dtype == torch.float16 else 0),
                ctypes.c_void_p(v.data_ptr()),
                ctypes.c_void_p(weights.data_ptr()),
                ctypes.c_void_p(bias.data_ptr()),
                dims,
                wdims,
                bdims,
                ctypes.c_int(heads),
                ctypes.c_float(eps),
                ctypes.c_float(c.head_dim**-0.5),
                ctypes.c_float(c.attn_dim**-0.5),
                ctypes.c_void_p(fused.data_ptr()),
                ctypes.c_void_p(attention.data_ptr()),
                ctypes.c_void_p(workspace.data_ptr()),
                ctypes.c_size_t(workspace.numel()),
                ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                error,
                ctypes.c_size_t(len(error)),
            )
            if status != 0:
                sys.exit(error.value.decode())
            return fused

        module = ccra.to(dtype)
        candidates = {
            f"PyTorch decomposed ({label})": lambda v=v, qd=qd, module=module: module.lpwca(v, qd)[0],
            f"CUDA kernel ({label} features)": kernel,
        }
        base = None
        with torch.inference_mode():
            for candidate, fn in candidates.items():
                ms = cuda_ms(fn, repeats)
                base = base or ms
                got = fn().float().cpu().numpy()
                cosine = compare_output("out", got, want, thresholds_for(label)).cosine
                row = {"preset": name, "batch": batch, "precision": label, "candidate": candidate, "ms": ms}
                rows.append({**row, "vs_pytorch": base / ms, "cosine": cosine})
    ccra.float()
    return rows


def cuda_main(args: argparse.Namespace, console: Console) -> None:
    if not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    console.print(f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = cuda_library(Path(tmp))
        for name in args.presets.split(","):
            with console.status(f"{name}: LPWCA stage on the GPU"):
                rows += cuda_rows(name, args.batch, args.repeats or 50, lib)
    table = Table(title=f"LPWCA stage on {torch.cuda.get_device_name()} (batch {args.batch}; target PyTorch/x >= 3)")
    for col in ("preset", "precision", "candidate", "ms", "PyTorch/x", "cosine"):
        table.add_column(col, justify="left" if col in ("preset", "precision", "candidate") else "right")
    for r in rows:
        table.add_row(
            r["preset"],
            r["precision"],
            r["candidate"],
            f"{r['ms']:.3f}",
            f"{r['vs_pytorch']:.2f}x",
            f"{r['cosine']:.6f}",
        )
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "stage": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=None, help="default: tiny,llava-1.5-7b (cpu), llava-1.5-7b (cuda)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=0, help="timed runs (default: 30 tiny, 5 others; 50 on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.device == "cuda":
        args.presets = args.presets or "llava-1.5-7b"
        cuda_main(args, Console(highlight=False, width=None if sys.stdout.isatty() else 150))
        return
    args.presets = args.presets or "tiny,llava-1.5-7b"
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
