"""`ccra-export bench`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ccra_export.cli import options as o
from ccra_export.cli.output import reports_errors, stderr, stdout
from ccra_export.core.manifest import read_manifest
from ccra_export.workflows.bench import run_bench, run_vision_bench


@click.command()
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
@o.options(o.backend("auto", "ort", "trt", help=o.RUN_BACKEND_HELP))
@reports_errors
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
    if vision_only or not read_manifest(bundle).get("language_model"):
        with stderr.status("Benchmarking the vision graph, then PyTorch"):
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
        stdout.print(table)
        if skipped:
            stderr.print(f"PyTorch side skipped: {escape(skipped)}")
        return
    with stderr.status("Benchmarking the bundle, then Hugging Face"):
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
    stdout.print(table)
