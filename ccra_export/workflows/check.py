"""`ccra-export check`: re-run a built bundle's parity, against PyTorch or the recorded reference."""

from __future__ import annotations

from pathlib import Path

from ccra_export.core.console import SILENT, Steps
from ccra_export.core.manifest import read_manifest, verify_files
from ccra_export.core.parity import ParityReport
from ccra_export.workflows.backends import open_bundle_backend
from ccra_export.workflows.parity import ParityOptions, check_parity, resolve_reference


def check_bundle(
    bundle: Path,
    *,
    parity: ParityOptions,
    backend: str = "auto",
    model_override: str | None = None,
    reference: str = "auto",
    plugin_library: Path | None = None,
    steps: Steps = SILENT,
) -> ParityReport:
    """Re-run parity of a built bundle: against PyTorch on fresh random inputs (a new seed unless
    one is given; INT8: the held-out images), or against the PyTorch outputs recorded at build time."""
    manifest = read_manifest(bundle)
    reference, reference_line = resolve_reference(reference, manifest, model_override)
    with steps.step("Verifying bundle file hashes"):
        verify_files(bundle, manifest)
    runner, line = open_bundle_backend(bundle, manifest, backend, plugin_library=plugin_library)
    steps.info(line)
    steps.info(reference_line)
    return check_parity(bundle, manifest, runner, reference, parity=parity, model_override=model_override, steps=steps)
