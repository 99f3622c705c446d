"""`ccra-export bench`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ccra_export.cli import options as o
from ccra_export.cli.output import reports_errors, stderr, stdout
from ccra_export.core.errors import CCRAExportError
from ccra_export.core.manifest import read_manifest
from ccra_export.workflows.bench import (
    DEFAULT_REPEATS,
    BenchResult,
    Spread,
    busy_machine,
    run_bench,
    run_vision_bench,
)


class BenchOptionError(CCRAExportError):
    """A bench option that does not apply to what is being timed."""


def spread(value: Spread, digits: int = 1, suffix: str = "") -> str:
    """``median (min–max)``: the middle of the rounds and how far a busy machine moved them."""
    return f"{value.median:.{digits}f}{suffix} ({value.low:.{digits}f}–{value.high:.{digits}f})"


@click.command()
@o.options(
    o.BUNDLE,
    o.opt(
        "image",
        "--image",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Image (default: a synthetic gradient).",
    ),
    o.max_new_tokens(
        32, 2, help="Tokens decoded per round (end-of-sequence disabled: both sides decode exactly this many)."
    ),
    o.opt(
        "repeats",
        "--repeats",
        default=DEFAULT_REPEATS,
        show_default=True,
        type=click.IntRange(1),
        help="Timed rounds, after one warm-up round. Every figure is shown as median (min–max) over them.",
    ),
    o.opt(
        "vision_only",
        "--vision-only",
        is_flag=True,
        help="Time the vision graph / engine alone (the default for a bundle without a language model).",
    ),
    o.opt(
        "batch",
        "--batch",
        type=click.IntRange(1),
        help="Vision-only: images per inference (default 1; at most the bundle's --max-batch).",
    ),
    o.opt(
        "model_override",
        "--model",
        metavar="DIR",
        help="The checkpoint the bundle was built from, to time PyTorch / Hugging Face on it too (its weights "
        "must match the manifest's hash). Without it (or without PyTorch) the bundle is timed alone.",
    ),
    o.run_backend("auto", "ort", "trt", "ort-trt"),
    o.PLUGIN_LIBRARY,
)
@reports_errors
def bench(
    bundle: Path,
    image: Path | None,
    max_new_tokens: int,
    new_tokens: int | None,
    repeats: int,
    vision_only: bool,
    batch: int | None,
    model_override: str | None,
    backend: str,
    plugin_library: Path | None,
) -> None:
    """Time the bundle against PyTorch on the same model and inputs, in the same run (each side
    in its own process).

    With a language model: vision latency, time to first token, decode tokens/s and peak memory,
    against Hugging Face generate. Vision-only: latency and images/s of the vision graph or
    TensorRT engine against the PyTorch reference, on the parity inputs the build recorded.
    Where PyTorch or the checkpoint (--model) is not here, the bundle is timed alone and a line
    says why.
    """
    tokens = o.deprecated_alias("max_new_tokens", max_new_tokens, new_tokens, "--max-new-tokens", "--new-tokens")
    if busy := busy_machine():
        stderr.print(f"[yellow]warning:[/yellow] {escape(busy)}", soft_wrap=True)
    if vision_only or not read_manifest(bundle).get("language_model"):
        with stderr.status("Benchmarking the vision graph, then PyTorch"):
            result = run_vision_bench(
                bundle, batch or 1, repeats, backend, model=model_override, plugin_library=plugin_library
            )
        _vision_table(bundle, result, batch or 1, repeats)
    else:
        if batch is not None:
            raise BenchOptionError(f"--batch {batch}: only the vision-only bench takes a batch; add --vision-only")
        with stderr.status("Benchmarking the bundle, then Hugging Face"):
            result = run_bench(
                bundle, image, tokens, repeats, backend, model=model_override, plugin_library=plugin_library
            )
        _pipeline_table(bundle, result, tokens, repeats)
    if result.skipped:
        stderr.print(f"PyTorch side skipped: {escape(result.skipped)}", soft_wrap=True)


def _vision_table(bundle: Path, result: BenchResult, batch: int, repeats: int) -> None:
    title = f"{bundle}: vision, batch {batch}; median (min–max) of {repeats} timed rounds after 1 warm-up"
    table = Table(title=title, title_justify="left")
    for column in ("", "ms", "images/s", "peak RSS MB", "cosine vs PyTorch"):
        table.add_column(column, justify="left" if not column else "right")
    for f in result.figures:
        cosine = "" if f.cosine_vs_pytorch is None else f"{f.cosine_vs_pytorch:.7f}"
        table.add_row(escape(f.side), spread(f.vision_ms, 2), spread(f.images_per_s), f"{f.peak_rss_mb:.0f}", cosine)
    ours = result.figures[0]
    if ours.vision_cached_ms is not None:
        table.add_row("ccra-export, same images again (tower cached)", spread(ours.vision_cached_ms, 2), "", "", "")
    if len(result.figures) == 2:
        theirs = result.figures[1]
        table.add_row("ratio (PyTorch / ours)", spread(theirs.vision_ms.over(ours.vision_ms), 2, "x"), "", "", "")
    if ours.vision_cached_ms is not None:
        speedup = spread(ours.vision_ms.over(ours.vision_cached_ms), 1, "x")
        table.add_row("ratio (new images / same images again)", speedup, "", "", "")
    stdout.print(table)
    _cache_line(ours.tower_cache)


def _cache_line(stats: dict[str, int] | None) -> None:
    """A split bundle's tower cache after the rounds: lookups and the memory one image takes."""
    if stats is None:
        return
    per_image = stats["bytes"] / max(stats["entries"], 1) / (1 << 20)
    stdout.print(
        f"tower cache: {stats['hits']} hits, {stats['misses']} misses; {stats['entries']} "
        f"image{'' if stats['entries'] == 1 else 's'} held in "
        f"{stats['bytes'] / (1 << 20):.1f} of {stats['max_bytes'] / (1 << 20):.0f} MiB ({per_image:.2f} MiB per image)"
    )


def _pipeline_table(bundle: Path, result: BenchResult, tokens: int, repeats: int) -> None:
    title = f"{bundle}: {tokens} new tokens; median (min–max) of {repeats} timed rounds after 1 warm-up"
    table = Table(title=title, title_justify="left")
    for column in ("", "vision ms", "first token ms", "decode tok/s", "peak RSS MB"):
        table.add_column(column, justify="left" if not column else "right")
    for f in result.figures:
        table.add_row(
            escape(f.side),
            spread(f.vision_ms),
            spread(f.first_token_ms),
            spread(f.decode_tokens_per_s),
            f"{f.peak_rss_mb:.0f}",
        )
    ours = result.figures[0]
    if ours.vision_cached_ms is not None:
        table.add_row(
            "ccra-export, question 2 about the same image",
            spread(ours.vision_cached_ms),
            spread(ours.first_token_cached_ms),
            "",
            "",
        )
    if len(result.figures) == 2:
        theirs = result.figures[1]
        table.add_row(
            "ratio (HF / ours; tok/s ours / HF)",
            spread(theirs.vision_ms.over(ours.vision_ms), 2, "x"),
            spread(theirs.first_token_ms.over(ours.first_token_ms), 2, "x"),
            spread(ours.decode_tokens_per_s.over(theirs.decode_tokens_per_s), 2, "x"),
            f"{theirs.peak_rss_mb / ours.peak_rss_mb:.2f}x",
        )
    if ours.vision_cached_ms is not None:
        table.add_row(
            "ratio (question 1 / question 2)",
            spread(ours.vision_ms.over(ours.vision_cached_ms), 1, "x"),
            spread(ours.first_token_ms.over(ours.first_token_cached_ms), 2, "x"),
            "",
            "",
        )
    stdout.print(table)
    _cache_line(ours.tower_cache)
