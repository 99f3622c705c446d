"""Parity runs: the artifact (graph or engine) against PyTorch, recomputed or recorded at build.

INT8 is judged on its held-out calibration images, every other precision on seeded random inputs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import BundleError, ConfigError
from ccra_export.core.extras import export_stack_available, require_export_stack
from ccra_export.core.manifest_schema import Manifest, ParityInputs, ThresholdsRecord
from ccra_export.core.parity import (
    PYTORCH_REFERENCE,
    RECORDED_REFERENCE,
    EmulatedFP16,
    EmulatedOutput,
    OutputParity,
    ParityReport,
    Thresholds,
    compare_output,
    compare_outputs,
    thresholds_for,
)
from ccra_export.core.reference_record import REFERENCE_FILE, load_reference
from ccra_export.core.sample_inputs import random_inputs
from ccra_export.core.vision_graphs import HEAD, TOWER, TOWER_FEATURES, GraphPart, parts_from_manifest
from ccra_export.workflows import quantization
from ccra_export.workflows.source import Source, recorded_module, reference_checkpoint, source_from_manifest

REFERENCE_CHOICES = ("auto", "pytorch", "recorded")


@dataclass
class ParityOptions:
    batch: int = 2
    text_len: int = 16
    seed: int | None = 0  # None: a fresh random seed (check)
    min_cosine: float | None = None
    max_scaled_abs_err: float | None = None


def thresholds(precision: str, options: ParityOptions, stored: ThresholdsRecord | None = None) -> Thresholds:
    base = thresholds_for(precision)
    if stored:  # the manifest's schema typed these; Thresholds refuses non-finite values
        base = Thresholds(
            stored["min_cosine"],
            stored["max_scaled_abs_err"],
            stored["allow_nonfinite"],
            # a bundle written before the per-token checks records none: today's defaults apply
            stored.get("min_token_cosine", base.min_token_cosine),
            stored.get("max_token_rel_err", base.max_token_rel_err),
        )
    return base.with_overrides(min_cosine=options.min_cosine, max_scaled_abs_err=options.max_scaled_abs_err)


def random_parity_feeds(source: Source, options: ParityOptions) -> tuple[dict[str, np.ndarray], ParityInputs]:
    """Seeded random graph inputs for parity, and their description for parity.json."""
    feeds = random_inputs(
        source.config,
        batch=options.batch,
        text_len=options.text_len,
        seed=options.seed,
        token_embeddings=source.token_embeddings,
    )
    described = ParityInputs(
        kind="random",
        seed=options.seed,
        batch=options.batch,
        text_len=options.text_len if source.config.ccra is not None else None,
        text_embeds="token embedding table rows" if source.token_embeddings is not None else "N(0, 1)",
    )
    return feeds, described


def parity_inputs(
    source: Source, parity: ParityOptions, calibration: Any = None
) -> tuple[dict[str, np.ndarray], ParityInputs, str]:
    """(feeds, description, step title) of a parity run: INT8 is judged on its held-out images,
    every other precision on seeded random inputs (a fresh seed when ``parity.seed`` is None)."""
    if calibration is not None:
        feeds, described = quantization.held_out_feeds(calibration)
        return feeds, described, f"Parity vs PyTorch (held-out images: {len(calibration.dataset.held_out)})"
    if parity.seed is None:
        parity.seed = secrets.randbelow(2**31)
    feeds, described = random_parity_feeds(source, parity)
    return feeds, described, f"Parity vs PyTorch (batch {parity.batch}, seed {parity.seed})"


def pytorch_outputs(source: Source, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The FP32 PyTorch reference on ``feeds``, keyed by graph output name."""
    from ccra_export.model.vision_model import reference_outputs

    return reference_outputs(source.model, feeds)


def pytorch_part_outputs(source: Source, part: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The FP32 PyTorch reference of one graph part (``core.vision_graphs``) on its own inputs."""
    from ccra_export.model.vision_model import reference_part_outputs

    return reference_part_outputs(source.model, part, feeds)


def split_feeds(source: Source, parts: tuple[GraphPart, ...], feeds: dict[str, np.ndarray]) -> dict[str, dict]:
    """Each graph's own inputs for the parity feeds: a split bundle's head reads PyTorch's tower output."""
    if len(parts) == 1:
        return {parts[0].name: feeds}
    features = pytorch_part_outputs(source, TOWER, feeds)[TOWER_FEATURES]
    head = {name: features if name == TOWER_FEATURES else feeds[name] for name in HEAD.inputs}
    return {TOWER.name: {name: feeds[name] for name in TOWER.inputs}, HEAD.name: head}


def graph_parity(
    source: Source,
    runner: Any,
    parts: tuple[GraphPart, ...],
    part_feeds: dict[str, dict[str, np.ndarray]],
    limits: Thresholds,
) -> dict[str, list[OutputParity]] | None:
    """A split bundle: the tower and the head each against PyTorch's same stage on the same inputs
    (the head on PyTorch's tower output), so a drift is pinned on the graph that causes it."""
    if len(parts) == 1:
        return None
    runners = {TOWER.name: runner.tower, HEAD.name: runner.head}
    results: dict[str, list[OutputParity]] = {}
    for part in parts:
        feeds = part_feeds[part.name]
        actual = runners[part.name].run(feeds)
        expected = pytorch_part_outputs(source, part, feeds)
        results[part.name] = [compare_output(n, actual[n], expected[n], limits) for n in part.outputs]
    return results


def run_parity(
    backend: Any,
    precision: str,
    thresholds: Thresholds,
    feeds: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    described: ParityInputs,
    reference_name: str = PYTORCH_REFERENCE,
) -> ParityReport:
    """The artifact on ``feeds`` against the reference outputs for the same inputs."""
    return compare_outputs(
        backend.run(feeds),
        reference,
        precision=precision,
        backend=backend.name,
        thresholds=thresholds,
        inputs=described,
        reference_name=reference_name,
    )


def resolve_reference(
    kind: str, manifest: Manifest, model_override: str | None = None, ccra_module: str | None = None
) -> tuple[str, str]:
    """``--reference`` -> ``pytorch`` | ``recorded``, and one line saying which and why.

    auto recomputes with PyTorch where PyTorch is installed and the source is at hand: a preset, or
    the checkpoint the user names with ``--model`` (re-hashed against the manifest). A bundle is a
    trust boundary, so the checkpoint path it records is never opened on its word. Otherwise, as
    on a Jetson, auto uses the outputs recorded at build.
    """
    if kind not in REFERENCE_CHOICES:
        raise ConfigError(f"expected one of {', '.join(REFERENCE_CHOICES)}", field="reference", value=kind)
    why = ""
    if kind == "auto" and not manifest.get("reference"):
        kind, why = "pytorch", " (auto: the bundle records no PyTorch outputs)"
    elif kind == "auto":
        if not export_stack_available():
            kind, why = "recorded", " (auto: PyTorch is not installed here)"
        elif manifest["source"]["kind"] == "checkpoint" and reference_checkpoint(manifest, model_override) is None:
            kind, why = "recorded", " (auto: --model CHECKPOINT recomputes it with PyTorch)"
        elif (module := recorded_module(manifest)) is not None and ccra_module is None:
            kind, why = "recorded", f" (auto: --ccra-module {module} recomputes it with PyTorch)"
        else:
            kind, why = "pytorch", " (auto: PyTorch and the bundle's source are here)"
    if kind == "recorded" and not manifest.get("reference"):
        raise BundleError(
            "this bundle has no recorded PyTorch outputs (built by an older ccra-export); "
            "rebuild it, or check it where PyTorch is installed",
            field="reference",
            value="recorded",
        )
    if kind == "pytorch":
        return kind, f"reference: PyTorch, recomputed from the bundle's source{why}"
    return kind, f"reference: the PyTorch outputs recorded at build time ({REFERENCE_FILE}){why}"


def check_parity(
    bundle: Path,
    manifest: Manifest,
    runner: Any,
    reference: str,
    *,
    parity: ParityOptions | None = None,
    model_override: str | None = None,
    ccra_module: str | None = None,
    steps: Steps = SILENT,
) -> ParityReport:
    """Parity of ``runner`` (the bundle's graph or engine) against ``reference`` (pytorch | recorded)."""
    parity = parity or ParityOptions(seed=None)
    precision = manifest["precision"]
    limits = thresholds(precision, parity, manifest["parity"]["thresholds"])
    if reference == "recorded":
        entry = manifest["reference"]
        assert entry is not None  # resolve_reference refuses "recorded" for a bundle without one
        feeds, expected = load_reference(Path(bundle) / entry["file"])
        described: ParityInputs = {**entry["inputs"], "recorded_samples": entry["samples"]}
        with steps.step(f"Parity vs recorded PyTorch outputs ({entry['samples']} samples)"):
            return run_parity(runner, precision, limits, feeds, expected, described, RECORDED_REFERENCE)
    require_export_stack("parity against a fresh PyTorch run (reference pytorch)")
    source = source_from_manifest(manifest, model_override, steps, ccra_module)
    if precision == "int8" and manifest["reference"]:
        # INT8 is judged on its held-out images: their inputs are recorded, PyTorch recomputes the outputs
        entry = manifest["reference"]
        feeds, _ = load_reference(Path(bundle) / entry["file"])
        described = {**entry["inputs"], "recorded_samples": entry["samples"]}
        title = f"Parity vs PyTorch on the recorded held-out inputs ({entry['samples']} samples)"
    else:
        feeds, described, title = parity_inputs(source, parity)
    with steps.step(title):
        report = run_parity(runner, precision, limits, feeds, pytorch_outputs(source, feeds), described)
        parts = parts_from_manifest(manifest)  # a split bundle: each graph against PyTorch's same stage too
        report.graphs = graph_parity(source, runner, parts, split_feeds(source, parts, feeds), limits)
        return report


def emulated_fp16(
    source: Source,
    feeds: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    limits: Thresholds,
    *,
    fp32_modules: list[str],
) -> tuple[EmulatedFP16, list[str]]:
    """FP16 arithmetic emulated with PyTorch's CPU half kernels, against the FP32 reference: with the
    graph's FP32 islands (``fp32_modules``: what a strongly typed engine computes; it gates the
    build) and with none (what weak typing risks; reported). Returns parity.json's rows and the
    failures."""
    from ccra_export.model.fp16_emulation import half_precision_outputs  # torch: the [export] extra

    rows: dict[str, dict[str, EmulatedOutput]] = {}
    failures: list[str] = []
    for label, modules in (("graph_islands", fp32_modules), ("no_islands", [])):
        outputs = half_precision_outputs(source.model, feeds, fp32_modules=modules)
        results = [compare_output(name, outputs[name], reference[name], limits) for name in reference]
        rows[label] = {r.name: EmulatedOutput(cosine=r.cosine, nonfinite=r.nonfinite, passed=r.passed) for r in results}
        if label == "graph_islands":
            failures += [
                f"emulated FP16 arithmetic, {r.name}: {', '.join(r.failures)}" for r in results if not r.passed
            ]
    emulated = EmulatedFP16(
        method="PyTorch reference in float16 on the CPU (half arithmetic, as a GPU)",
        fp32_modules=fp32_modules,
        graph_islands=rows["graph_islands"],
        no_islands=rows["no_islands"],
    )
    return emulated, failures
