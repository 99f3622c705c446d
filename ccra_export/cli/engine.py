"""`ccra-export engine`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ccra_export.cli import options as o
from ccra_export.cli.output import finish, reports_errors, stderr, stdout
from ccra_export.core.console import Steps, parity_table
from ccra_export.engine.settings import ProfileOptions, TrtOptions
from ccra_export.workflows.engine import add_engine


@click.command()
@o.options(
    o.BUNDLE,
    o.PLUGIN_LIBRARY,
    o.PROFILE,
    o.REFERENCE,
    o.MODEL_OVERRIDE,
    o.CCRA_MODULE_CHECK,
    o.opt("force", "--force", is_flag=True, help="Replace the engine the bundle already holds."),
    o.ENGINE,
)
@reports_errors
def engine(
    bundle: Path,
    plugin_library: Path | None,
    reference: str,
    model_override: str | None,
    ccra_module: str | None,
    force: bool,
    profile: dict[str, Any],
    trt: dict[str, Any],
) -> None:
    """Build the TensorRT engine of an existing bundle on this machine, and prove its parity.

    Engines are tied to one TensorRT version and GPU, so build the bundle on a workstation, copy
    it to the Jetson and run this there: it needs TensorRT, not PyTorch or the checkpoint (the
    engine is compared with the PyTorch outputs the build recorded). The engine and its record
    (TensorRT version, GPU, compute capability, plugin hash) go into the bundle; `run`, `bench`
    and `check` then use it. Exit code 3 when parity fails (the engine is kept for inspection).
    """
    report = add_engine(
        bundle,
        trt_options=o.into(TrtOptions, trt),
        plugin_library=plugin_library,
        profile_overrides=o.into(ProfileOptions, profile).overrides(),
        reference=reference,
        model_override=model_override,
        ccra_module=ccra_module,
        force=force,
        steps=Steps(stderr),
    )
    stdout.print(parity_table(report, title=f"Parity of the TensorRT engine(s) in {bundle}"))
    finish(report)
