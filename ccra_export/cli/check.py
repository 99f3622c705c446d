"""`ccra-export check`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ccra_export.cli import options as o
from ccra_export.cli.output import finish, reports_errors, stderr, stdout
from ccra_export.core.console import Steps, lm_table, parity_table
from ccra_export.workflows.check import check_bundle
from ccra_export.workflows.parity import ParityOptions


@click.command()
@o.options(
    o.BUNDLE,
    o.opt(
        "parity.seed",
        "--seed",
        type=o.SEED,
        help="Seed of the fresh parity inputs (default: a new random seed, printed).",
    ),
    o.MODEL_OVERRIDE,
    o.CCRA_MODULE_CHECK,
    o.REFERENCE,
    o.PLUGIN_LIBRARY,
    o.PARITY,
    o.backend("auto", "ort", "trt", "ort-trt"),
)
@reports_errors
def check(
    bundle: Path,
    model_override: str | None,
    ccra_module: str | None,
    reference: str,
    plugin_library: Path | None,
    backend: str,
    parity: dict[str, Any],
) -> None:
    """Re-run parity of a bundle against PyTorch (fresh random inputs; INT8: its held-out images).

    Verifies the bundle's file hashes, rebuilds the PyTorch reference from the manifest's
    source (preset + seed, or the checkpoint, whose weights hash must match), and compares.
    Where PyTorch is not installed (a Jetson), it compares with the PyTorch outputs the build
    recorded in the bundle instead.
    """
    report = check_bundle(
        bundle,
        parity=o.into(ParityOptions, parity),
        backend=backend,
        model_override=model_override,
        ccra_module=ccra_module,
        reference=reference,
        plugin_library=plugin_library,
        steps=Steps(stderr),
    )
    stdout.print(parity_table(report, title=f"Parity check of {bundle}"))
    if report.language_model is not None:
        stdout.print(lm_table(report.language_model))
    finish(report)
