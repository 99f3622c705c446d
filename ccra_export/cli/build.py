"""`ccra-export build`."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape

from ccra_export.cli import options as o
from ccra_export.cli.output import finish, reports_errors, stderr, stdout
from ccra_export.core.console import Steps, layer_table, lm_table, parity_table
from ccra_export.workflows.build import BuildOptions, build_bundle


@click.command()
@o.options(
    o.EXPORT, o.PROFILE, o.PLUGIN_LIBRARY, o.INT8, o.ENGINE, o.PARITY, o.backend("auto", "ort", "trt", "ort-trt")
)
@reports_errors
def build(**values: Any) -> None:
    """Export the vision graph, run it, check parity against PyTorch, write a bundle.

    Exit code 0 only when parity passes; 3 when it fails (the bundle is still written, so
    parity.json can be inspected); 2 for bad input (nothing is written).
    """
    result = build_bundle(o.into(BuildOptions, values), Steps(stderr))
    stdout.print(parity_table(result.report))
    if result.report.layers is not None:
        stdout.print(layer_table(result.report))
    if result.report.language_model is not None:
        stdout.print(lm_table(result.report.language_model))
    files = ", ".join(result.manifest["files"])  # graph (+ external data, INT8 caches)
    stdout.print(escape(f"bundle: {result.bundle} ({files}, manifest.json, parity.json)"))
    finish(result.report)
