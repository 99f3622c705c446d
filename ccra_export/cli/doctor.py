"""`ccra-export doctor`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
from click.core import ParameterSource
from rich.markup import escape
from rich.table import Table

from ccra_export.cli import options as o
from ccra_export.cli.output import reports_errors, stdout
from ccra_export.core.errors import ConfigError
from ccra_export.core.memory_budget import (
    CUDA_RUNTIME_BYTES,
    JETSON_MODULE_NAMES,
    JETSON_MODULES,
    MemoryBudget,
    SlotFit,
    gib,
    jetson_module,
    require_fit,
)
from ccra_export.workflows.doctor import memory_budget, run_checks

DEFAULTS = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
#: the options that only mean something with --bundle
BUDGET_FLAGS = {
    "device": "--device",
    "context": "--context",
    "parallel": "--parallel",
    "tower_cache_mib": "--tower-cache-mib",
    "measure": "--measure",
}


@click.command()
@o.options(
    o.opt(
        "bundle",
        "--bundle",
        type=click.Path(path_type=Path),
        help="Print this bundle's memory budget instead (a bundle built with --lm-precision): weights, vision, KV "
        "per slot, tower cache, runtime overhead, and how many slots fit each Jetson module.",
    ),
    o.opt(
        "device",
        "--device",
        metavar="|".join(JETSON_MODULE_NAMES),
        help="With --bundle: the Jetson module to fit (CPU and GPU share its memory); refuses when --parallel slots "
        "do not fit, saying how much is missing. Default: a table of every module.",
    ),
    o.opt(
        "context",
        "--context",
        type=int,
        help="With --bundle: tokens per KV slot (default: the bundle's context; at most it).",
    ),
    o.opt("parallel", "--parallel", type=int, default=1, show_default=True, help="With --bundle: decode slots to fit."),
    o.tower_cache_mib("the server holds "),
    o.opt(
        "measure",
        "--measure",
        is_flag=True,
        help="With --bundle: measure the runtime overhead now (loads the bundle in a child process and answers one "
        "question, seconds to minutes) instead of the figure recorded on an x86-64 CPU.",
    ),
)
@click.option("--json", "as_json", is_flag=True, help="Print the checks (or the budget) as JSON.")
@reports_errors
def doctor(
    bundle: Path | None,
    device: str | None,
    context: int | None,
    parallel: int,
    tower_cache_mib: float,
    measure: bool,
    as_json: bool,
) -> None:
    """Report what is installed and usable: ONNX Runtime providers, TensorRT, GPU, Jetson/JetPack,
    CUDA toolkit, the LPWCA libraries; with the fix for each missing piece. With --bundle, the bundle's
    memory budget instead."""
    if bundle is not None:
        module = jetson_module(device) if device is not None else None  # an unknown module: before any file is read
        budget = memory_budget(bundle, context, parallel, tower_cache_mib, measure)
        fits = [require_fit(budget, module)] if module is not None else [budget.fit(m) for m in JETSON_MODULES]
        if as_json:
            click.echo(json.dumps(_budget_json(budget, fits), indent=2))
        else:
            _print_budget(bundle, budget, fits)
        return
    context_ = click.get_current_context()
    given = [flag for name, flag in BUDGET_FLAGS.items() if context_.get_parameter_source(name) not in DEFAULTS]
    if given:
        raise ConfigError(f"{', '.join(given)}: a memory budget needs --bundle B")
    checks = run_checks()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
        return
    table = Table(title="ccra-export doctor", title_justify="left")
    for column in ("", "component", "status", "fix"):
        table.add_column(column, overflow="fold")  # a path is wrapped whole, never cut to an ellipsis
    for c in checks:
        table.add_row("[green]✓[/green]" if c.ok else "[red]✗[/red]", c.component, escape(c.detail), escape(c.fix))
    stdout.print(table)


def _budget_json(budget: MemoryBudget, fits: list[SlotFit]) -> dict[str, object]:
    return {
        **dataclasses.asdict(budget),
        "slot_bytes": budget.slot_bytes,
        "kv_bytes": budget.kv_bytes,
        "fixed_bytes": budget.footprint.fixed_bytes,
        "total_bytes": budget.total_bytes,
        "cuda_runtime_bytes": CUDA_RUNTIME_BYTES,
        "modules": [{**dataclasses.asdict(fit), "available_bytes": fit.module.available_bytes} for fit in fits],
    }


def _print_budget(bundle: Path, budget: MemoryBudget, fits: list[SlotFit]) -> None:
    footprint, kv = budget.footprint, budget.kv
    slots = f"{budget.parallel} slot{'s' if budget.parallel > 1 else ''}"
    table = Table(
        title=f"Memory budget of {escape(str(bundle))}: {slots} of {budget.context} tokens", title_justify="left"
    )
    for column in ("", "bytes", "what"):
        table.add_column(column, overflow="fold")
    per_image = f", {gib(footprint.tower_image_bytes)} per image" if footprint.tower_image_bytes else ""
    rows = [
        ("decoder weights", footprint.decoder_bytes, "its ONNX file and external data"),
        ("token embeddings", footprint.embeddings_bytes, "embed.onnx (looked up on the CPU)"),
        (f"vision ({footprint.vision_kind})", footprint.vision_bytes, "file bytes; TensorRT adds its activations"),
        (
            "tower cache",
            footprint.tower_cache_bytes,
            f"--tower-cache-mib bound{per_image}" if footprint.tower_image_bytes else "none: a single-graph bundle",
        ),
        ("runtime overhead", footprint.overhead.bytes, footprint.overhead.how),
        (
            "KV per slot",
            budget.slot_bytes,
            f"{kv.layers} layers x 2 x {kv.kv_heads} KV heads x {budget.context} tokens x {kv.head_size} x "
            f"{kv.itemsize} B ({kv.dtype}, the decoder's past_key_values type)",
        ),
        (f"total, {slots}", budget.total_bytes, "what the server holds at most (held conversations aside)"),
    ]
    for name, count, what in rows:
        table.add_row(name, gib(count), escape(what))
    stdout.print(table)
    modules = Table(
        title="Jetson modules (CPU and GPU share the memory; JetPack, the OS and the CUDA runtime are assumed)",
        title_justify="left",
    )
    for column in (
        "module",
        "memory",
        "assumed taken",
        "left for KV",
        f"slots of {budget.context}",
        f"longest context, {slots}",
    ):
        modules.add_column(column, overflow="fold")
    for fit in fits:
        module = fit.module
        modules.add_row(
            module.name,
            gib(module.memory_bytes),
            f"{gib(module.system_bytes)} + {gib(CUDA_RUNTIME_BYTES)}",
            gib(fit.kv_budget_bytes),
            str(fit.slots),
            str(fit.context_for_wanted) if fit.context_for_wanted else "none",
        )
    stdout.print(modules)
    stdout.print(
        "Assumed, not measured: JetPack and the OS (firmware carveouts, CMA, a headless Ubuntu; a desktop takes ~1 GiB "
        f"more) and {gib(CUDA_RUNTIME_BYTES)} for the CUDA context and libraries. The runtime overhead was measured "
        "on a CPU: a Jetson's differs."
    )
