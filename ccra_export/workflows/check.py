"""`ccra-export check`: re-run a built bundle's parity, against PyTorch or the recorded reference."""

from __future__ import annotations

from pathlib import Path

from ccra_export.core.console import SILENT, Steps
from ccra_export.core.manifest import read_manifest, verify_files
from ccra_export.core.manifest_schema import LanguageModelRecord
from ccra_export.core.parity import LanguageModelReport, ParityReport
from ccra_export.runtime import lm_parity
from ccra_export.runtime.language_model import LanguageModel
from ccra_export.runtime.vlm_pipeline import LM_DIR
from ccra_export.workflows.backends import open_bundle_backend
from ccra_export.workflows.parity import ParityOptions, check_parity, resolve_reference


def check_bundle(
    bundle: Path,
    *,
    parity: ParityOptions,
    backend: str = "auto",
    model_override: str | None = None,
    ccra_module: str | None = None,
    reference: str = "auto",
    plugin_library: Path | None = None,
    steps: Steps = SILENT,
) -> ParityReport:
    """Re-run parity of a built bundle: against PyTorch on fresh random inputs (a new seed unless
    one is given; INT8: the held-out images), or against the PyTorch outputs recorded at build time."""
    manifest = read_manifest(bundle)
    reference, reference_line = resolve_reference(reference, manifest, model_override, ccra_module)
    with steps.step("Verifying bundle file hashes"):
        verify_files(bundle, manifest)
    runner, line = open_bundle_backend(bundle, manifest, backend, plugin_library=plugin_library)
    steps.info(line)
    steps.info(reference_line)
    report = check_parity(
        bundle,
        manifest,
        runner,
        reference,
        parity=parity,
        model_override=model_override,
        ccra_module=ccra_module,
        steps=steps,
    )
    if manifest["language_model"]:
        _check_language_model(Path(bundle), manifest["language_model"], report, steps)
    return report


def _check_language_model(bundle: Path, record: LanguageModelRecord, report: ParityReport, steps: Steps) -> None:
    """Rerun the decoder on the prompt the build recorded; compare with Hugging Face's answer and
    with the build's own figures (torch-free: this runs on a Jetson too)."""
    ran_on = lm_parity.runnable_device(record["device"])
    title = f"Language model vs its build-time figures ({len(record['parity']['tokens'])} greedy tokens, {ran_on})"
    with steps.step(title):
        lm = LanguageModel(bundle / LM_DIR, ran_on)
        measured = lm_parity.figures(lm, bundle / lm_parity.LM_REFERENCE_FILE)
    figures: LanguageModelReport = {
        "reference": "recorded at build time",
        "precision": record["precision"],
        "device": record["device"],
        "ran_on": ran_on,
        **measured,
        "built": record["parity"],
    }
    report.language_model = figures
    report.extra_failures += lm_parity.failures(record["precision"], figures, record["parity"])
