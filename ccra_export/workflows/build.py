"""Wiring of the stages behind `ccra-export build` and `ccra-export check`.

Each function here calls into a stage (export, runtime) and the shared core; the CLI parses
flags and presents results. A build writes into a staging directory beside ``--output`` and
renames it into place only when the bundle is complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ccra_export import atomic
from ccra_export.config import PRESETS, ModelConfig
from ccra_export.console import SILENT, Steps
from ccra_export.errors import BundleError, CheckpointError, ConfigError
from ccra_export.extras import export_stack_available, require_export_stack
from ccra_export.manifest import (
    MANIFEST_NAME,
    PARITY_NAME,
    file_entries,
    new_manifest,
    read_manifest,
    verify_files,
)
from ccra_export.parity import (
    PYTORCH_REFERENCE,
    RECORDED_REFERENCE,
    ParityReport,
    Thresholds,
    compare_outputs,
    thresholds_for,
)
from ccra_export.pipeline_engine import ENGINE_FILE, TrtOptions
from ccra_export.pipeline_int8 import Int8Options
from ccra_export.reference_record import REFERENCE_FILE, load_reference, record_reference
from ccra_export.sample_inputs import random_inputs

PRECISIONS = ("fp32", "fp16", "int8")
LPWCA_MODES = ("auto", "fused", "portable")
GRAPH_FILE = "vision.onnx"
REFERENCE_CHOICES = ("auto", "pytorch", "recorded")


@dataclass
class Source:
    """The PyTorch reference a bundle is built from and checked against."""

    model: Any  # CCRAVisionModel (torch stays out of this module's import time)
    config: ModelConfig
    record: dict[str, Any]
    token_embeddings: np.ndarray | None = None


@dataclass
class ParityOptions:
    batch: int = 2
    text_len: int = 16
    seed: int | None = 0  # None: a fresh random seed (check)
    min_cosine: float | None = None
    max_scaled_abs_err: float | None = None


@dataclass
class BuildOptions:
    model: str
    output: Path
    precision: str = "fp16"
    random_weights: bool = False
    plain: bool = False
    seed: int = 0
    force: bool = False
    backend: str = "auto"
    opset: int = 20
    external_data: str = "auto"
    keep_ccra_fp32: bool = True
    lpwca: str = "auto"
    plugin_library: Path | None = None
    int8: Int8Options = field(default_factory=Int8Options)
    lm_precision: str | None = None
    trt: TrtOptions = field(default_factory=lambda: TrtOptions())
    max_batch: int = 8
    opt_batch: int | None = None  # None: 1
    max_text_len: int = 512
    opt_text_len: int | None = None  # None: min(64, max_text_len)
    parity: ParityOptions = field(default_factory=ParityOptions)


@dataclass
class BuildResult:
    bundle: Path
    manifest: dict[str, Any]
    report: ParityReport


def resolve_source(model: str, *, random_weights: bool, seed: int, plain: bool, steps: Steps = SILENT) -> Source:
    """A preset (random weights only: presets carry no trained weights) or a checkpoint directory."""
    from ccra_export.config import preset
    from ccra_export.vision_model import build_model

    if model in PRESETS:
        if not random_weights:
            raise ConfigError(
                f"--model {model}: a preset has no trained weights; "
                "add --random-weights, or pass a checkpoint directory"
            )
        config = preset(model, plain=plain)
        with steps.step(f"Building {config.name} ({config.variant}) with random weights, seed {seed}"):
            built = build_model(config, seed=seed)
        return Source(built, config, {"kind": "preset", "preset": model, "plain": plain, "seed": seed})

    path = Path(model)
    if not path.exists():
        if os.sep in model or model.startswith("."):
            raise CheckpointError(f"--model {model}: no such checkpoint directory")
        raise ConfigError(
            f"--model: unknown preset {model!r}; expected one of {', '.join(PRESETS)} or a checkpoint directory"
        )
    if random_weights or plain:
        flag = "--random-weights" if random_weights else "--plain"
        raise ConfigError(f"{flag} applies to presets; --model {model} is a checkpoint directory")
    from ccra_export.checkpoint import load_checkpoint

    with steps.step(f"Loading checkpoint {path}"):
        loaded = load_checkpoint(path)
    if loaded.config.ccra is None:
        steps.info(
            f"{path}: no ccra.safetensors; building the plain LLaVA-1.5 variant (graph input: pixel_values only)"
        )
    record = {"kind": "checkpoint", "path": str(path.resolve()), "weights_sha256": loaded.weights_sha256}
    return Source(loaded.model, loaded.config, record, loaded.token_embeddings())


def _check_output_dir(output: Path, force: bool) -> None:
    if output.exists():
        if not output.is_dir():
            raise BundleError(f"--output {output}: exists and is not a directory")
        if (output / MANIFEST_NAME).exists():
            if not force:
                raise BundleError(f"--output {output}: already holds a bundle; pass --force to replace it")
        elif any(output.iterdir()):
            raise BundleError(
                f"--output {output}: exists, is not empty and holds no bundle; choose a new or empty directory"
            )
    parent = output.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"--output {output}: cannot create parent directory ({exc.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"--output {output}: parent directory {parent} is not writable")


def _thresholds(precision: str, options: ParityOptions, stored: dict[str, Any] | None = None) -> Thresholds:
    base = Thresholds(**stored) if stored else thresholds_for(precision)
    return base.with_overrides(min_cosine=options.min_cosine, max_scaled_abs_err=options.max_scaled_abs_err)


def random_parity_feeds(source: Source, options: ParityOptions) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Seeded random graph inputs for parity, and their description for parity.json."""
    feeds = random_inputs(
        source.config,
        batch=options.batch,
        text_len=options.text_len,
        seed=options.seed,
        token_embeddings=source.token_embeddings,
    )
    described = {
        "kind": "random",
        "seed": options.seed,
        "batch": options.batch,
        "text_len": options.text_len if source.config.ccra is not None else None,
        "text_embeds": "token embedding table rows" if source.token_embeddings is not None else "N(0, 1)",
    }
    return feeds, described


def parity_inputs(
    source: Source, parity: ParityOptions, calibration: Any = None
) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """(feeds, description, step title) of a parity run: INT8 is judged on its held-out images,
    every other precision on seeded random inputs (a fresh seed when ``parity.seed`` is None)."""
    if calibration is not None:
        from ccra_export import pipeline_int8

        feeds, described = pipeline_int8.held_out_feeds(calibration)
        return feeds, described, f"Parity vs PyTorch (held-out images: {len(calibration.dataset.held_out)})"
    if parity.seed is None:
        parity.seed = secrets.randbelow(2**31)
    feeds, described = random_parity_feeds(source, parity)
    return feeds, described, f"Parity vs PyTorch (batch {parity.batch}, seed {parity.seed})"


def pytorch_outputs(source: Source, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The FP32 PyTorch reference on ``feeds``, keyed by graph output name."""
    from ccra_export.vision_model import reference_outputs

    return reference_outputs(source.model, feeds)


def run_parity(
    backend: Any,
    precision: str,
    thresholds: Thresholds,
    feeds: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    described: dict[str, Any],
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


def resolve_lpwca(mode: str, backend: str, config: ModelConfig) -> tuple[str, str]:
    """(portable | fused | none, why): ``auto`` fuses for TensorRT, stays portable for ONNX Runtime."""
    if mode not in LPWCA_MODES:
        raise ConfigError(f"--lpwca {mode}: expected one of {', '.join(LPWCA_MODES)}")
    if config.ccra is None:
        if mode == "fused":
            raise ConfigError("--lpwca fused: this model is the plain LLaVA-1.5 variant and has no LPWCA stage")
        return "none", "plain variant: no LPWCA stage"
    if mode != "auto":
        return mode, f"--lpwca {mode}"
    if backend in ("trt", "ort-trt"):
        return "fused", "auto: TensorRT runs ccra::LPWCA as one plugin node"
    return "portable", (
        "auto: ONNX Runtime runs the decomposed graph with its own kernels; "
        "--lpwca fused runs the node there through the C++ CPU kernel"
    )


def _plugin_record(lpwca: str, plugin_library: Path | None) -> dict[str, Any] | None:
    """What the TensorRT parser needs to find for a fused graph, and the libraries' hashes."""
    if lpwca != "fused":
        return None
    from ccra_export import lpwca_schema
    from ccra_export.hashing import sha256_file
    from ccra_export.runtime.lpwca_cpu import library_path

    cpu = library_path()
    record: dict[str, Any] = {
        "node": f"{lpwca_schema.DOMAIN}::{lpwca_schema.OP_TYPE}",
        "plugin_name": lpwca_schema.OP_TYPE,
        "plugin_version": lpwca_schema.PLUGIN_VERSION,
        "plugin_namespace": lpwca_schema.PLUGIN_NAMESPACE,
        "cpu_kernel_library": {"file": cpu.name, "sha256": sha256_file(cpu)},
        "tensorrt_plugin_library": None,
    }
    if plugin_library is not None:
        if not Path(plugin_library).is_file():
            raise ConfigError(f"--plugin-library {plugin_library}: no such file")
        record["tensorrt_plugin_library"] = {"file": Path(plugin_library).name, "sha256": sha256_file(plugin_library)}
    return record


def build_bundle(options: BuildOptions, steps: Steps = SILENT) -> BuildResult:
    """Export, check, run and parity-check the vision graph; write the bundle atomically."""
    if options.precision not in PRECISIONS:
        raise ConfigError(f"--precision {options.precision}: expected one of {', '.join(PRECISIONS)}")
    require_export_stack("ccra-export build")
    from ccra_export.runtime.backends import resolve_backend

    output = Path(options.output)
    _check_output_dir(output, options.force)
    backend_kind, backend_reason = resolve_backend(options.backend)  # before any slow work
    if options.lm_precision and options.model in PRESETS:
        raise ConfigError("--lm-precision needs a checkpoint directory: presets have no language model or tokenizer")
    source = resolve_source(
        options.model, random_weights=options.random_weights, seed=options.seed, plain=options.plain, steps=steps
    )

    from ccra_export import pipeline_int8
    from ccra_export.calibration.layer_report import per_layer_drift
    from ccra_export.export import check_graph, graph_interface
    from ccra_export.runtime.trt_plan import profile_axes

    int8 = options.precision == "int8"
    lpwca, lpwca_reason = resolve_lpwca(options.lpwca, backend_kind, source.config)
    if int8 and lpwca == "fused":
        if options.lpwca == "fused":
            raise ConfigError(
                "--precision int8 with --lpwca fused: ONNX Runtime's calibrator opens its own session, which cannot "
                "load the ccra::LPWCA custom op; use --lpwca portable (TensorRT runs the Q/DQ graph as it is)"
            )
        lpwca, lpwca_reason = "portable", "auto: INT8 calibrates the portable graph"
    if lpwca != "none":
        steps.info(f"LPWCA: {lpwca} ({lpwca_reason})")
    plugin = _plugin_record(lpwca, options.plugin_library)
    if backend_kind == "trt" and plugin and not options.plugin_library:
        raise ConfigError(
            "--lpwca fused with --backend trt needs --plugin-library (build it: ccra-export plugins build)"
        )
    dynamic_axes = profile_axes(
        has_text=source.config.ccra is not None,
        max_batch=options.max_batch,
        opt_batch=options.opt_batch,
        max_text_len=options.max_text_len,
        opt_text_len=options.opt_text_len,
    )
    calibration = pipeline_int8.prepare(options.int8, source, options.seed, steps) if int8 else None
    try:
        with (
            atomic.staged_directory(output, replace=options.force) as stage,
            tempfile.TemporaryDirectory(prefix=f".{output.name}.fp32-", dir=output.resolve().parent) as scratch,
        ):
            written = _write_graph(stage, Path(scratch), source, lpwca, calibration, options, steps)
            with steps.step("onnx.checker full check and shape inference"):
                interface = graph_interface(check_graph(stage / GRAPH_FILE))
            backend, engine = _open_backend(
                stage, backend_kind, backend_reason, interface, dynamic_axes, plugin, options, steps
            )
            thresholds = _thresholds(options.precision, options.parity)
            feeds, described, title = parity_inputs(source, options.parity, calibration)
            with steps.step(title):
                reference = pytorch_outputs(source, feeds)
                report = run_parity(backend, options.precision, thresholds, feeds, reference, described)
            recorded = record_reference(stage / REFERENCE_FILE, feeds, reference)
            if int8:
                with steps.step("Per-layer drift, INT8 vs FP32 graph"):
                    report.layers, report.first_drift = per_layer_drift(written.fp32_graph, stage / GRAPH_FILE, feeds)
            lm_record = _add_language_model(stage, Path(scratch), source, report, options, steps)
            atomic.write_json(stage / PARITY_NAME, report.to_dict())
            files = [
                *written.files,
                REFERENCE_FILE,
                *([ENGINE_FILE] if engine else []),
                *(lm_record or {}).get("files", []),
            ]
            manifest = new_manifest(
                **_manifest_fields(source, options, lpwca, interface, dynamic_axes, written.graph_files),
                files=file_entries(stage, files),
                backend={"name": backend.name, "description": backend.description},
                parity={"file": PARITY_NAME, "passed": report.passed, "thresholds": dataclasses.asdict(thresholds)},
                reference={"file": REFERENCE_FILE, "samples": recorded, "inputs": described},
                engine=engine,
                plugin=plugin,
                calibration=written.calibration,
                language_model=lm_record,
                image_processor=dataclasses.asdict(pipeline_int8.processor_for(source, options.int8.pad_to_square)),
            )
            atomic.write_json(stage / MANIFEST_NAME, manifest)
    except OSError as exc:
        raise BundleError(f"--output {output}: cannot write the bundle ({exc.strerror or exc})") from None
    return BuildResult(output, manifest, report)


@dataclass
class _WrittenGraph:
    graph_files: list[str]  # the graph, then its external data
    files: list[str]  # everything written (graph files and INT8 caches)
    calibration: dict[str, Any] | None = None
    fp32_graph: Path | None = None  # INT8: the FP32 graph it was quantized from (scratch)


def _write_graph(
    stage: Path, scratch: Path, source: Source, lpwca: str, calibration: Any, options: BuildOptions, steps: Steps
) -> _WrittenGraph:
    """Export to ONNX and write the graph in the bundle's precision (FP32, FP16, or calibrated INT8)."""
    from ccra_export import pipeline_int8
    from ccra_export.export import convert_to_fp16, export_model_proto, save_model

    fused_note = ", LPWCA fused" if lpwca == "fused" else ""
    with steps.step(f"Exporting {source.config.name} to ONNX (opset {options.opset}, dynamic batch{fused_note})"):
        proto = export_model_proto(source.model, opset=options.opset, lpwca="fused" if lpwca == "fused" else "portable")
    if options.precision == "fp16":
        with steps.step("Converting to FP16 (Softmax and the CCRA module kept FP32)"):
            proto = convert_to_fp16(proto, keep_ccra_fp32=options.keep_ccra_fp32)
    if options.precision != "int8":
        with steps.step(f"Writing {GRAPH_FILE}"):
            graph_files = save_model(proto, stage / GRAPH_FILE, options.external_data)
        return _WrittenGraph(graph_files, list(graph_files))
    fp32_graph = scratch / GRAPH_FILE  # kept aside for the per-layer drift report
    save_model(proto, fp32_graph, options.external_data)
    del proto
    graph_files, record = pipeline_int8.quantize(fp32_graph, stage, GRAPH_FILE, calibration, options.int8, steps)
    caches = [pipeline_int8.ORT_CACHE, pipeline_int8.TRT_CACHE]
    return _WrittenGraph(graph_files, [*graph_files, *caches], record, fp32_graph)


def _open_backend(
    stage: Path,
    kind: str,
    reason: str,
    interface: dict[str, Any],
    dynamic_axes: dict[str, Any],
    plugin: dict[str, Any] | None,
    options: BuildOptions,
    steps: Steps,
) -> tuple[Any, dict[str, Any] | None]:
    """The backend that runs the bundle for parity, and the engine record when TensorRT built one."""
    from ccra_export.pipeline_engine import build_trt_engine
    from ccra_export.runtime.backends import select_backend
    from ccra_export.runtime.trt_plan import optimization_profiles

    engine = None
    profile = optimization_profiles(interface["inputs"], dynamic_axes)
    library = options.plugin_library if plugin else None  # build_bundle checked it is given for TensorRT
    if kind == "trt":
        backend, engine = build_trt_engine(
            stage / GRAPH_FILE, stage / ENGINE_FILE, options.precision, profile, library, options.trt, steps
        )
        line = f"backend: {backend.description}"
    else:
        with steps.step("Creating the runtime session"):
            ort_options = {}
            if kind == "ort-trt":
                from ccra_export.runtime import ort_trt

                ort_options = ort_trt.session_options(
                    stage,
                    options.precision,
                    profile,
                    library,
                    workspace_mib=options.trt.workspace_mib,
                    optimization_level=options.trt.optimization_level,
                )
            backend, line = select_backend(kind, stage / GRAPH_FILE, **ort_options)
    steps.info(f"{line} ({reason})" if reason else line)
    return backend, engine


def _add_language_model(
    stage: Path, scratch: Path, source: Source, report: ParityReport, options: BuildOptions, steps: Steps
) -> dict[str, Any] | None:
    """``--lm-precision``: the decoder and embedding model into the bundle, their parity into the report."""
    if not options.lm_precision:
        return None
    from ccra_export import pipeline_lm

    record = pipeline_lm.export_into(Path(source.record["path"]), stage, scratch, options.lm_precision, steps)
    report.language_model = pipeline_lm.parity(Path(record.pop("hf_dir")), stage / "lm", steps)
    lm = report.language_model
    if options.lm_precision == "fp32" and lm["tokens_agreeing"] != lm["greedy_steps"]:
        report.extra_failures.append(
            f"language model: FP32 greedy tokens differ from transformers at step {lm['identical_prefix']}"
        )
    return record


def _manifest_fields(
    source: Source,
    options: BuildOptions,
    lpwca: str,
    interface: dict[str, Any],
    dynamic_axes: dict[str, Any],
    graph_files: list[str],
) -> dict[str, Any]:
    import torch

    from ccra_export.ccra_module import ccra_parameter_count

    config = source.config
    return {
        "model": config.to_dict(),
        "variant": config.variant,
        "ccra_parameters": ccra_parameter_count(config.ccra, config.vision.hidden_size) if config.ccra else 0,
        "source": source.record,
        "precision": options.precision,
        "export": {
            "exporter": f"torch.onnx (dynamo) torch {torch.__version__}",
            "opset": interface["opset"],
            "ir_version": interface["ir_version"],
            "ccra_fp32_in_fp16": options.keep_ccra_fp32 if options.precision == "fp16" else None,
            "lpwca": lpwca,
        },
        "graph": {
            "file": GRAPH_FILE,
            "external_data": graph_files[1:],
            "inputs": interface["inputs"],
            "outputs": interface["outputs"],
        },
        "dynamic_axes": dynamic_axes,
    }


def source_from_manifest(manifest: dict[str, Any], model_override: str | None, steps: Steps = SILENT) -> Source:
    """Rebuild the PyTorch reference a bundle was built from, refusing a changed checkpoint."""
    record = manifest["source"]
    if record["kind"] == "preset":
        if model_override:
            raise ConfigError("--model applies to bundles built from a checkpoint; this one was built from a preset")
        return resolve_source(
            record["preset"], random_weights=True, seed=record["seed"], plain=record["plain"], steps=steps
        )
    path = model_override or record["path"]
    if not Path(path).is_dir():
        raise CheckpointError(f"checkpoint {path} (from the manifest) is not there; pass --model with its new location")
    source = resolve_source(path, random_weights=False, seed=0, plain=False, steps=steps)
    if source.record["weights_sha256"] != record["weights_sha256"]:
        raise CheckpointError(
            f"--model {path}: weights differ from the ones this bundle was built from (sha256 mismatch)"
        )
    return source


def resolve_reference(kind: str, manifest: dict[str, Any], model_override: str | None = None) -> tuple[str, str]:
    """``--reference`` -> ``pytorch`` | ``recorded``, and one line saying which and why.

    auto recomputes with PyTorch (fresh inputs, the checkpoint re-hashed) where PyTorch and the
    bundle's source are at hand, and otherwise, as on a Jetson, uses the outputs recorded at build.
    """
    if kind not in REFERENCE_CHOICES:
        raise ConfigError(f"--reference {kind}: expected one of {', '.join(REFERENCE_CHOICES)}")
    why = ""
    if kind == "auto" and not manifest.get("reference"):
        kind, why = "pytorch", " (auto: the bundle records no PyTorch outputs)"
    elif kind == "auto":
        source = manifest.get("source", {})
        checkpoint = model_override or source.get("path")
        if not export_stack_available():
            kind, why = "recorded", " (auto: PyTorch is not installed here)"
        elif source.get("kind") == "checkpoint" and not (checkpoint and Path(checkpoint).is_dir()):
            kind, why = "recorded", f" (auto: checkpoint {checkpoint} is not here; --model DIR to recompute)"
        else:
            kind, why = "pytorch", " (auto: PyTorch and the bundle's source are here)"
    if kind == "recorded" and not manifest.get("reference"):
        raise BundleError(
            "--reference recorded: this bundle has no recorded PyTorch outputs (built by an older ccra-export); "
            "rebuild it, or check it where PyTorch is installed"
        )
    if kind == "pytorch":
        return kind, f"reference: PyTorch, recomputed from the bundle's source{why}"
    return kind, f"reference: the PyTorch outputs recorded at build time ({REFERENCE_FILE}){why}"


def check_parity(
    bundle: Path,
    manifest: dict[str, Any],
    runner: Any,
    reference: str,
    *,
    parity: ParityOptions | None = None,
    model_override: str | None = None,
    steps: Steps = SILENT,
) -> ParityReport:
    """Parity of ``runner`` (the bundle's graph or engine) against ``reference`` (pytorch | recorded)."""
    parity = parity or ParityOptions(seed=None)
    precision = manifest["precision"]
    thresholds = _thresholds(precision, parity, manifest["parity"]["thresholds"])
    if reference == "recorded":
        entry = manifest["reference"]
        feeds, expected = load_reference(Path(bundle) / entry["file"])
        described = {**entry["inputs"], "recorded_samples": entry["samples"]}
        with steps.step(f"Parity vs recorded PyTorch outputs ({entry['samples']} samples)"):
            return run_parity(runner, precision, thresholds, feeds, expected, described, RECORDED_REFERENCE)
    require_export_stack("parity against a fresh PyTorch run (--reference pytorch)")
    try:
        source = source_from_manifest(manifest, model_override, steps)
    except KeyError as exc:
        raise BundleError(f"{Path(bundle) / MANIFEST_NAME}: manifest lacks {exc}") from None
    calibration = None
    if precision == "int8":
        from ccra_export import pipeline_int8

        calibration = pipeline_int8.held_out_from_manifest(
            manifest["calibration"], source, manifest["source"].get("seed", 0)
        )
    feeds, described, title = parity_inputs(source, parity, calibration)
    with steps.step(title):
        return run_parity(runner, precision, thresholds, feeds, pytorch_outputs(source, feeds), described)


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
    from ccra_export.runtime.backends import bundle_backend

    manifest = read_manifest(bundle)
    reference, reference_line = resolve_reference(reference, manifest, model_override)
    with steps.step("Verifying bundle file hashes"):
        verify_files(bundle, manifest)
    runner, line = bundle_backend(bundle, manifest, backend, plugin_library=plugin_library)
    steps.info(line)
    steps.info(reference_line)
    return check_parity(bundle, manifest, runner, reference, parity=parity, model_override=model_override, steps=steps)
