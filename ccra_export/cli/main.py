"""`ccra-export` command line: flag parsing and presentation only; the work is in ``pipeline``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from ccra_export import __version__
from ccra_export.config import PRESETS
from ccra_export.errors import CCRAExportError

BACKEND_HELP = (
    "What runs the graph. auto: TensorRT when it imports and sees a GPU (an engine is built into the bundle), "
    "else ONNX Runtime (CUDA provider if installed, else CPU); ort: ONNX Runtime; trt: a native TensorRT engine; "
    "ort-trt: ONNX Runtime's TensorRT execution provider."
)

# Off a terminal (CI logs, pipes) rich falls back to 80 columns, too narrow for the parity table.
_stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 130)
_stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 130)


def _reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user-facing error into one line on stderr and its exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CCRAExportError as exc:
            _stderr.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            _stderr.print("[bold red]interrupted[/bold red]: nothing was written")
            sys.exit(130)

    return wrapper


def _options(*options: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One decorator applying several click options in the order listed (as --help shows them)."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


_parity_options = _options(
    click.option(
        "--parity-batch",
        default=2,
        show_default=True,
        type=click.IntRange(1, 64),
        help="Batch size of the parity inputs.",
    ),
    click.option(
        "--parity-text-len",
        default=16,
        show_default=True,
        type=click.IntRange(1, 4096),
        help="Instruction length (tokens) of the parity inputs.",
    ),
    click.option(
        "--min-cosine",
        type=click.FloatRange(-1.0, 1.0),
        help="Override the cosine-similarity threshold (default per precision: fp32 0.99999, fp16 0.999).",
    ),
    click.option(
        "--max-abs-err",
        "max_scaled_abs_err",
        type=click.FloatRange(0.0),
        help="Override the max |error| / max |reference| threshold (default: 1e-4 for fp32, off for fp16).",
    ),
    click.option(
        "--backend",
        type=click.Choice(["auto", "ort", "trt", "ort-trt"]),
        default="auto",
        show_default=True,
        help=BACKEND_HELP,
    ),
)

# TensorRT builder settings, shared by `build` (--backend trt / ort-trt) and `engine`.
_engine_options = _options(
    click.option(
        "--trt-typing",
        type=click.Choice(["auto", "strong", "weak"]),
        default="auto",
        show_default=True,
        help="TensorRT engine typing. auto: strongly typed on TensorRT 11 (the only mode left), weakly typed with "
        "FP16/INT8 builder flags on TensorRT 10; strong keeps the ONNX graph's types exactly.",
    ),
    click.option(
        "--workspace-mib",
        default=2048,
        show_default=True,
        type=click.IntRange(64),
        help="TensorRT workspace pool limit (Jetson shares its DRAM with the CPU).",
    ),
    click.option(
        "--opt-level",
        default=3,
        show_default=True,
        type=click.IntRange(0, 5),
        help="TensorRT builder optimization level (higher: longer build, possibly faster engine).",
    ),
    click.option(
        "--timing-cache",
        type=click.Path(path_type=Path, dir_okay=False),
        default=Path.home() / ".cache" / "ccra-export" / "timing.cache",
        show_default=True,
        help="TensorRT timing cache, read before and written after every engine build.",
    ),
)

_reference_option = click.option(
    "--reference",
    type=click.Choice(["auto", "pytorch", "recorded"]),
    default="auto",
    show_default=True,
    help="What parity compares against. pytorch: the PyTorch model rebuilt from the bundle's source, on fresh "
    "inputs; recorded: the PyTorch outputs the build stored in the bundle (no PyTorch or checkpoint needed); "
    "auto: pytorch where PyTorch and the source are at hand, else recorded.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ccra-export")
def main() -> None:
    """Export CCRA (and plain LLaVA-1.5) vision-language models to ONNX / TensorRT, with parity proof.

    A build traces the CLIP vision tower + CCRA module + LLaVA projector from PyTorch to ONNX
    (FP32, FP16 or calibrated INT8), runs the result on the selected backend and compares it with
    PyTorch on the same inputs; with --lm-precision it adds the quantized language model. The
    bundle directory it writes holds the graphs, manifest.json and parity.json.

    \b
    Quick start (no GPU needed):
      ccra-export build --model tiny --random-weights --precision fp16 --output out/tiny
      ccra-export check --bundle out/tiny
    \b
    From a LLaVA checkpoint to text:
      ccra-export build --model CKPT --lm-precision int4 --output out/vlm
      ccra-export run --bundle out/vlm --image photo.jpg --prompt "What is in the picture?"
    """


@main.command()
@click.option(
    "--model",
    "model",
    required=True,
    metavar="PRESET|DIR",
    help=f"A preset ({', '.join(PRESETS)}) with --random-weights, or a local Hugging Face LLaVA-1.5 "
    "checkpoint directory (see README: Checkpoint layout).",
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle directory to write; must be new or empty (or a bundle, with --force).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default="fp16",
    show_default=True,
    help="Precision of the exported graph. fp16: weights, compute and I/O (Softmax and the CCRA module kept FP32). "
    "int8: Q/DQ graph calibrated on --calib-data (FP32 I/O; LayerNorm, Softmax and CCRA kept float).",
)
@click.option(
    "--random-weights",
    is_flag=True,
    help="Fill a preset with seeded random weights (tests, benchmarks, trying the toolchain).",
)
@click.option(
    "--plain",
    is_flag=True,
    help="With a preset: the plain LLaVA-1.5 variant (projector only, no CCRA; input pixel_values only).",
)
@click.option("--seed", default=0, show_default=True, help="Seed for --random-weights and for the parity inputs.")
@click.option(
    "--force", is_flag=True, help="Replace an existing bundle in --output (only once the new one is complete)."
)
@click.option(
    "--opset",
    default=20,
    show_default=True,
    type=click.IntRange(17, 23),
    help="ONNX opset (>= 17 for LayerNormalization).",
)
@click.option(
    "--external-data",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Store weights in vision.onnx.data. auto: when they exceed 1.5 GiB (protobuf's limit is 2 GiB).",
)
@click.option(
    "--ccra-fp16/--ccra-fp32",
    "ccra_fp16",
    default=False,
    show_default=True,
    help="With --precision fp16: run the CCRA module in FP16 too (LPWCA's re-weighting can overflow FP16).",
)
@click.option(
    "--max-batch",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="Largest batch recorded in the manifest's optimization profile (TensorRT engines).",
)
@click.option(
    "--opt-batch",
    type=click.IntRange(1),
    help="Batch TensorRT tunes its kernels for (the profile's opt shape). Default: 1.",
)
@click.option(
    "--max-text-len",
    default=512,
    show_default=True,
    type=click.IntRange(1),
    help="Longest instruction (tokens) recorded in the manifest's optimization profile.",
)
@click.option(
    "--opt-text-len",
    type=click.IntRange(1),
    help="Instruction length TensorRT tunes its kernels for. Default: 64 (or --max-text-len if smaller).",
)
@click.option(
    "--lpwca",
    type=click.Choice(["auto", "fused", "portable"]),
    default="auto",
    show_default=True,
    help="LPWCA as one ccra::LPWCA node (fused: the TensorRT plugin; the C++ CPU kernel under ONNX Runtime) "
    "or as standard ops (portable). auto: fused for TensorRT, portable for ONNX Runtime.",
)
@click.option(
    "--plugin-library",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The built TensorRT plugin library (libccra_lpwca_plugin.so), hashed into the manifest.",
)
@click.option("--calib-data", type=click.Path(path_type=Path), help="INT8: folder of .jpg/.png calibration images.")
@click.option(
    "--prompts",
    type=click.Path(path_type=Path, dir_okay=False),
    help="INT8: one instruction per image (file-name order), else a default set of instructions.",
)
@click.option(
    "--calib-method",
    type=click.Choice(["entropy", "minmax", "percentile"]),
    default="entropy",
    show_default=True,
    help="INT8 calibration: KL-divergence histogram, min/max, or 99.999th percentile.",
)
@click.option(
    "--calib-batch-size", default=4, show_default=True, type=click.IntRange(1), help="INT8: images per batch."
)
@click.option(
    "--holdout", type=click.IntRange(1), help="INT8: images kept out of calibration for parity (default 10%)."
)
@click.option("--max-calib-images", type=click.IntRange(2), help="INT8: use at most this many images of the folder.")
@click.option("--int8-ccra", is_flag=True, help="INT8: quantize the CCRA module's matmuls too (kept float by default).")
@click.option(
    "--pad-to-square/--no-pad-to-square",
    default=True,
    show_default=True,
    help="Preprocess like LLaVA-1.5 (image_aspect_ratio 'pad') before CLIP's resize and crop.",
)
@click.option(
    "--trt-cache-version",
    default="10.3.0",
    show_default=True,
    help="INT8: TensorRT version written into calibration.cache's header (the TensorRT that reads it).",
)
@click.option(
    "--lm-precision",
    type=click.Choice(["int4", "int8", "fp16", "fp32"]),
    help="Also build the language model (onnxruntime-genai builder: INT4 MatMulNBits, INT8, FP16 or FP32) into the "
    "bundle, for `ccra-export run`. Needs a checkpoint with its tokenizer.",
)
@_engine_options
@_parity_options
@_reports_errors
def build(
    model: str,
    output: Path,
    precision: str,
    random_weights: bool,
    plain: bool,
    seed: int,
    force: bool,
    opset: int,
    external_data: str,
    ccra_fp16: bool,
    max_batch: int,
    opt_batch: int | None,
    max_text_len: int,
    opt_text_len: int | None,
    parity_batch: int,
    parity_text_len: int,
    min_cosine: float | None,
    max_scaled_abs_err: float | None,
    backend: str,
    lpwca: str,
    plugin_library: Path | None,
    calib_data: Path | None,
    prompts: Path | None,
    calib_method: str,
    calib_batch_size: int,
    holdout: int | None,
    max_calib_images: int | None,
    int8_ccra: bool,
    pad_to_square: bool,
    trt_cache_version: str,
    lm_precision: str | None,
    trt_typing: str,
    workspace_mib: int,
    opt_level: int,
    timing_cache: Path,
) -> None:
    """Export the vision graph, run it, check parity against PyTorch, write a bundle.

    Exit code 0 only when parity passes; 3 when it fails (the bundle is still written, so
    parity.json can be inspected); 2 for bad input (nothing is written).
    """
    from ccra_export.console import Steps, layer_table, parity_table
    from ccra_export.pipeline import BuildOptions, ParityOptions, TrtOptions, build_bundle
    from ccra_export.pipeline_int8 import Int8Options

    options = BuildOptions(
        model=model,
        output=output,
        precision=precision,
        lpwca=lpwca,
        plugin_library=plugin_library,
        lm_precision=lm_precision,
        trt=TrtOptions(
            typing=trt_typing, workspace_mib=workspace_mib, optimization_level=opt_level, timing_cache=timing_cache
        ),
        int8=Int8Options(
            calib_data=calib_data,
            prompts=prompts,
            method=calib_method,
            batch_size=calib_batch_size,
            holdout=holdout,
            limit=max_calib_images,
            quantize_ccra=int8_ccra,
            pad_to_square=pad_to_square,
            trt_version=trt_cache_version,
        ),
        random_weights=random_weights,
        plain=plain,
        seed=seed,
        force=force,
        backend=backend,
        opset=opset,
        external_data=external_data,
        keep_ccra_fp32=not ccra_fp16,
        max_batch=max_batch,
        opt_batch=opt_batch,
        max_text_len=max_text_len,
        opt_text_len=opt_text_len,
        parity=ParityOptions(
            batch=parity_batch,
            text_len=parity_text_len,
            seed=seed,
            min_cosine=min_cosine,
            max_scaled_abs_err=max_scaled_abs_err,
        ),
    )
    result = build_bundle(options, Steps(_stderr))
    _stdout.print(parity_table(result.report))
    if result.report.layers is not None:
        _stdout.print(layer_table(result.report))
    files = ", ".join(result.manifest["files"])  # graph (+ external data, INT8 caches)
    _stdout.print(escape(f"bundle: {result.bundle} ({files}, manifest.json, parity.json)"))
    _finish(result.report)


@main.command()
@click.option(
    "--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory written by `ccra-export build`."
)
@click.option(
    "--seed", type=int, default=None, help="Seed of the fresh parity inputs (default: a new random seed, printed)."
)
@click.option(
    "--model", "model_override", metavar="DIR", help="Where the source checkpoint is now, if it moved since the build."
)
@_reference_option
@click.option(
    "--plugin-library",
    type=click.Path(path_type=Path, dir_okay=False),
    help="--backend ort-trt with a fused graph: the LPWCA plugin library built for this machine.",
)
@_parity_options
@_reports_errors
def check(
    bundle: Path,
    seed: int | None,
    model_override: str | None,
    reference: str,
    plugin_library: Path | None,
    parity_batch: int,
    parity_text_len: int,
    min_cosine: float | None,
    max_scaled_abs_err: float | None,
    backend: str,
) -> None:
    """Re-run parity of a bundle against PyTorch (fresh random inputs; INT8: its held-out images).

    Verifies the bundle's file hashes, rebuilds the PyTorch reference from the manifest's
    source (preset + seed, or the checkpoint, whose weights hash must match), and compares.
    Where PyTorch is not installed (a Jetson), it compares with the PyTorch outputs the build
    recorded in the bundle instead.
    """
    from ccra_export.console import Steps, parity_table
    from ccra_export.pipeline import ParityOptions, check_bundle

    parity = ParityOptions(
        batch=parity_batch,
        text_len=parity_text_len,
        seed=seed,
        min_cosine=min_cosine,
        max_scaled_abs_err=max_scaled_abs_err,
    )
    report = check_bundle(
        bundle,
        parity=parity,
        backend=backend,
        model_override=model_override,
        reference=reference,
        plugin_library=plugin_library,
        steps=Steps(_stderr),
    )
    _stdout.print(parity_table(report, title=f"Parity check of {bundle}"))
    _finish(report)


@main.command()
@click.option(
    "--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory written by `ccra-export build`."
)
@click.option(
    "--plugin-library",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The LPWCA plugin built for this machine (ccra-export plugins build); needed for a fused graph, and "
    "serialised into the engine.",
)
@click.option("--max-batch", type=click.IntRange(1), help="Profile's largest batch. Default: the manifest's.")
@click.option("--opt-batch", type=click.IntRange(1), help="Profile's tuning batch. Default: the manifest's.")
@click.option("--max-text-len", type=click.IntRange(1), help="Profile's longest instruction. Default: the manifest's.")
@click.option("--opt-text-len", type=click.IntRange(1), help="Profile's tuning length. Default: the manifest's.")
@_reference_option
@click.option(
    "--model", "model_override", metavar="DIR", help="--reference pytorch: where the source checkpoint is now."
)
@click.option("--force", is_flag=True, help="Replace the engine the bundle already holds.")
@_engine_options
@_reports_errors
def engine(
    bundle: Path,
    plugin_library: Path | None,
    max_batch: int | None,
    opt_batch: int | None,
    max_text_len: int | None,
    opt_text_len: int | None,
    reference: str,
    model_override: str | None,
    force: bool,
    trt_typing: str,
    workspace_mib: int,
    opt_level: int,
    timing_cache: Path,
) -> None:
    """Build the TensorRT engine of an existing bundle on this machine, and prove its parity.

    Engines are tied to one TensorRT version and GPU, so build the bundle on a workstation, copy
    it to the Jetson and run this there: it needs TensorRT, not PyTorch or the checkpoint (the
    engine is compared with the PyTorch outputs the build recorded). The engine and its record
    (TensorRT version, GPU, compute capability, plugin hash) go into the bundle; `run`, `bench`
    and `check` then use it. Exit code 3 when parity fails (the engine is kept for inspection).
    """
    from ccra_export.console import Steps, parity_table
    from ccra_export.pipeline_engine import TrtOptions, add_engine

    overrides: dict[str, dict[str, int]] = {}
    for axis, key, value in (
        ("batch", "max", max_batch),
        ("batch", "opt", opt_batch),
        ("text_len", "max", max_text_len),
        ("text_len", "opt", opt_text_len),
    ):
        if value is not None:
            overrides.setdefault(axis, {})[key] = value
    report = add_engine(
        bundle,
        trt_options=TrtOptions(
            typing=trt_typing, workspace_mib=workspace_mib, optimization_level=opt_level, timing_cache=timing_cache
        ),
        plugin_library=plugin_library,
        profile_overrides=overrides,
        reference=reference,
        model_override=model_override,
        force=force,
        steps=Steps(_stderr),
    )
    _stdout.print(parity_table(report, title=f"Parity of {bundle}/vision.engine"))
    _finish(report)


@main.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle built with --lm-precision.")
@click.option("--image", required=True, type=click.Path(path_type=Path), help="Image file (jpg, png, ...).")
@click.option("--prompt", required=True, help="The question or instruction about the image.")
@click.option(
    "--max-new-tokens",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Stop after this many generated tokens (or at the end-of-sequence token).",
)
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0),
    help="0: greedy decoding; above 0: sampling at this temperature.",
)
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0), help="Nucleus sampling mass.")
@click.option("--seed", type=int, help="Sampling seed.")
@click.option("--verify", is_flag=True, help="Re-hash every bundle file against the manifest before running.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "ort", "trt"]),
    default="auto",
    show_default=True,
    help="Vision graph runtime: auto uses the bundle's TensorRT engine where TensorRT is usable.",
)
@_reports_errors
def run(
    bundle: Path,
    image: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    verify: bool,
    backend: str,
) -> None:
    """Answer PROMPT about IMAGE with the bundle's vision graph and language model, streaming tokens."""
    from ccra_export.runtime.language_model import Sampling
    from ccra_export.runtime.vlm_pipeline import Pipeline, load_image

    picture = load_image(image)  # a bad image fails before the models load
    pipeline = Pipeline.from_bundle(bundle, backend=backend, verify=verify)
    sampling = Sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_ids=pipeline.lm.eos_ids
    )
    _, generation, prepared = pipeline.generate_tokens(
        picture, prompt, sampling, on_text=lambda piece: click.echo(piece, nl=False)
    )
    click.echo()
    steps = len(generation.tokens)
    _stderr.print(
        f"[dim]{prepared.inputs_embeds.shape[1]} prompt tokens ({prepared.visual_tokens.shape[1]} visual), "
        f"{steps} new; first token {generation.prefill_s * 1e3:.0f} ms, "
        f"{max(steps - 1, 0) / max(generation.decode_s, 1e-9):.1f} tokens/s[/dim]"
    )


@main.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--image", type=click.Path(path_type=Path, dir_okay=False), help="Image (default: a synthetic gradient).")
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(2), help="Tokens decoded per round.")
@click.option(
    "--repeats", default=3, show_default=True, type=click.IntRange(1), help="Timed rounds (after one warm-up)."
)
@click.option(
    "--vision-only",
    is_flag=True,
    help="Time the vision graph / engine alone (the default for a bundle without a language model).",
)
@click.option(
    "--batch", default=1, show_default=True, type=click.IntRange(1), help="Vision-only: images per inference."
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "ort", "trt"]),
    default="auto",
    show_default=True,
    help="What runs the vision graph: auto uses the bundle's TensorRT engine where TensorRT is usable.",
)
@_reports_errors
def bench(
    bundle: Path,
    image: Path | None,
    new_tokens: int,
    repeats: int,
    vision_only: bool,
    batch: int,
    backend: str,
) -> None:
    """Time the bundle against PyTorch on the same model and inputs, in the same run (each side
    in its own process).

    With a language model: vision latency, time to first token, decode tokens/s and peak memory,
    against Hugging Face generate. Vision-only: latency and images/s of the vision graph or
    TensorRT engine against the PyTorch reference, on the parity inputs the build recorded.
    """
    from rich.table import Table

    from ccra_export.bench_bundle import run_bench, run_vision_bench
    from ccra_export.manifest import read_manifest

    if vision_only or not read_manifest(bundle).get("language_model"):
        with _stderr.status("Benchmarking the vision graph, then PyTorch"):
            figures, skipped = run_vision_bench(bundle, batch, max(repeats, 3), backend)
        table = Table(title=f"{bundle}: vision, batch {batch}, median of {max(repeats, 3)}", title_justify="left")
        for column in ("", "ms", "images/s", "peak RSS MB", "cosine vs PyTorch"):
            table.add_column(column, justify="left" if not column else "right")
        for f in figures:
            cosine = "" if f.cosine_vs_pytorch is None else f"{f.cosine_vs_pytorch:.7f}"
            table.add_row(escape(f.side), f"{f.vision_ms:.2f}", f"{f.images_per_s:.1f}", f"{f.peak_rss_mb:.0f}", cosine)
        if len(figures) == 2:
            ours, theirs = figures
            table.add_row("ratio (PyTorch / ours)", f"{theirs.vision_ms / ours.vision_ms:.2f}x", "", "", "")
        _stdout.print(table)
        if skipped:
            _stderr.print(f"PyTorch side skipped: {escape(skipped)}")
        return
    with _stderr.status("Benchmarking the bundle, then Hugging Face"):
        ours, theirs = run_bench(bundle, image, new_tokens, repeats, backend)
    table = Table(title=f"{bundle}: {new_tokens} new tokens, median of {repeats}", title_justify="left")
    for column in ("", "vision ms", "first token ms", "decode tok/s", "peak RSS MB"):
        table.add_column(column, justify="left" if not column else "right")
    for f in (ours, theirs):
        table.add_row(
            escape(f.side),
            f"{f.vision_ms:.1f}",
            f"{f.first_token_ms:.1f}",
            f"{f.decode_tokens_per_s:.1f}",
            f"{f.peak_rss_mb:.0f}",
        )
    table.add_row(
        "ratio (HF / ours; tok/s ours / HF)",
        f"{theirs.vision_ms / ours.vision_ms:.2f}x",
        f"{theirs.first_token_ms / ours.first_token_ms:.2f}x",
        f"{ours.decode_tokens_per_s / theirs.decode_tokens_per_s:.2f}x",
        f"{theirs.peak_rss_mb / ours.peak_rss_mb:.2f}x",
    )
    _stdout.print(table)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@_reports_errors
def doctor(as_json: bool) -> None:
    """Report what is installed and usable: ONNX Runtime providers, TensorRT, GPU, Jetson/JetPack,
    CUDA toolkit, the LPWCA libraries; with the fix for each missing piece."""
    import dataclasses
    import json

    from rich.table import Table

    from ccra_export.doctor import run_checks

    checks = run_checks()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
        return
    table = Table(title="ccra-export doctor", title_justify="left")
    for column in ("", "component", "status", "fix"):
        table.add_column(column)
    for c in checks:
        table.add_row("[green]✓[/green]" if c.ok else "[red]✗[/red]", c.component, escape(c.detail), escape(c.fix))
    _stdout.print(table)


@main.group()
def plugins() -> None:
    """Build the native LPWCA libraries: TensorRT plugin, CUDA kernels, CPU kernel.

    \b
    On a Jetson (JetPack 6: TensorRT headers in /usr/include/aarch64-linux-gnu):
      ccra-export plugins build --cuda-arch 87
    """


@plugins.command("build")
@click.option(
    "--build-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("build/plugins"),
    show_default=True,
    help="CMake build directory.",
)
@click.option(
    "--tensorrt-root",
    type=click.Path(path_type=Path, file_okay=False),
    help="TensorRT installation (holds include/NvInferRuntime.h). Default: $TensorRT_ROOT, then the "
    "system paths (JetPack, deb packages).",
)
@click.option(
    "--cuda-arch", help="CUDA architectures, e.g. 87 (Orin), 110 (Thor), 'native'. Default: 80,86,87,89,90,110."
)
@click.option("--jobs", "-j", type=click.IntRange(1), help="Parallel compile jobs (default: all cores).")
@_reports_errors
def plugins_build(build_dir: Path, tensorrt_root: Path | None, cuda_arch: str | None, jobs: int | None) -> None:
    """Configure and build with the root CMakeLists.txt, run the C++ tests, list the libraries."""
    from rich.table import Table

    from ccra_export.console import Steps
    from ccra_export.native_build import build_native

    built = build_native(
        build_dir, tensorrt_root=tensorrt_root, cuda_architectures=cuda_arch, jobs=jobs, steps=Steps(_stderr)
    )
    table = Table(title="Built libraries", title_justify="left")
    for column in ("library", "path", "sha256"):
        table.add_column(column)
    for library in built:
        table.add_row(library.label, str(library.path), library.sha256[:16])
    _stdout.print(table)
    _stdout.print("Record the plugin in a bundle with `ccra-export build --lpwca fused --plugin-library PATH`.")


def _finish(report: Any) -> None:
    if report.passed:
        _stdout.print("[green]parity passed[/green]")
        return
    _stderr.print(f"[bold red]parity FAILED:[/bold red] {escape(report.failure_summary())}", soft_wrap=True)
    sys.exit(3)


if __name__ == "__main__":
    main()
