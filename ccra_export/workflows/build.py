"""`ccra-export build`: export, check, run and parity-check the vision graph; write the bundle.

Each function here calls into a stage (export, calibration, engine, runtime) and the shared core;
the CLI parses flags and presents results. A build writes into a staging directory beside
``--output`` and renames it into place only when the bundle is complete, so a failure leaves
nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccra_export.calibration.layer_report import per_layer_drift_chain
from ccra_export.core import atomic, lpwca_schema
from ccra_export.core.config import PRESETS, ModelConfig
from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import BundleError, ConfigError, Remedy
from ccra_export.core.extras import require_export_stack
from ccra_export.core.graph_scopes import nodes_in_scope
from ccra_export.core.hashing import sha256_file
from ccra_export.core.manifest import (
    MANIFEST_NAME,
    PARITY_NAME,
    file_entries,
    manifest_record,
    new_manifest,
    write_manifest,
)
from ccra_export.core.manifest_schema import (
    AxisRange,
    BackendRecord,
    CalibrationPartRecord,
    CalibrationRecord,
    CalibrationSettings,
    EngineBuild,
    EngineRecord,
    ExportRecord,
    GraphInterface,
    GraphPartRecord,
    GraphRecord,
    LanguageModelParity,
    LanguageModelRecord,
    LibraryRecord,
    LMQuantRecord,
    Manifest,
    ModelRecord,
    ParityRecord,
    PluginRecord,
    QuantizedGraph,
    ReferenceRecord,
    SourceRecord,
    ThresholdsRecord,
)
from ccra_export.core.parity import KeptFP32, ParityReport
from ccra_export.core.plugin_library import check_plugin_library
from ccra_export.core.reference_record import REFERENCE_FILE, record_reference
from ccra_export.core.vision_graphs import TOWER, TOWER_FEATURES, GraphPart, graph_parts
from ccra_export.engine import ort_trt
from ccra_export.engine.build import build_trt_engine, engine_files, join_engine_records
from ccra_export.engine.plan import optimization_profiles, profile_axes
from ccra_export.engine.settings import ProfileOptions, TrtOptions
from ccra_export.export.fp16 import convert_to_fp16
from ccra_export.export.fp16_ranges import activation_ranges, over_range
from ccra_export.export.graph_checks import check_graph, graph_interface
from ccra_export.export.lm_export import DecoderOptions, LMQuant
from ccra_export.runtime import lm_parity
from ccra_export.runtime.backends import join_parts, resolve_backend, select_backend
from ccra_export.runtime.lpwca_cpu import library_path
from ccra_export.runtime.vision_backend import default_ort_providers
from ccra_export.workflows import language_model, quantization
from ccra_export.workflows.evaluate import EVAL_DIR, record_evaluation_set
from ccra_export.workflows.parity import (
    ParityOptions,
    emulated_fp16,
    graph_parity,
    parity_inputs,
    pytorch_outputs,
    run_parity,
    split_feeds,
    thresholds,
)
from ccra_export.workflows.quantization import Int8Options
from ccra_export.workflows.source import Source, language_model_request, resolve_source

PRECISIONS = ("fp32", "fp16", "int8")
STAGE_SCOPES = ("vision_tower", "ccra", "multi_modal_projector")  # module scopes the exporter records
LPWCA_MODES = ("auto", "fused", "portable")


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
    ccra_fp16: bool = False  # FP16 builds: the CCRA module in FP16 too (default: kept FP32)
    lpwca: str = "auto"
    plugin_library: Path | None = None
    int8: Int8Options = field(default_factory=Int8Options)
    ccra_module: str | None = None  # package.module:Factory: a plug-in CCRA module instead of the reconstruction
    #: vision_tower.onnx + ccra_head.onnx (tower outputs cached per image); None: yes for CCRA, no for plain
    split_vision: bool | None = None
    lm_precision: str | None = None
    lm_device: str = "auto"
    lm_quant: LMQuant = field(default_factory=LMQuant)  #: INT4/INT8 decoders: the builder's recipe
    #: the decoder's context, pruned LM head and KV cache type
    lm_decoder: DecoderOptions = field(default_factory=DecoderOptions)
    trt: TrtOptions = field(default_factory=TrtOptions)
    profile: ProfileOptions = field(default_factory=ProfileOptions)
    parity: ParityOptions = field(default_factory=ParityOptions)


@dataclass
class BuildResult:
    bundle: Path
    manifest: Manifest
    report: ParityReport


def _check_output_dir(output: Path, force: bool) -> None:
    if output.exists():
        if not output.is_dir():
            raise BundleError("exists and is not a directory", field="output", value=output)
        if (output / MANIFEST_NAME).exists():
            if not force:
                raise BundleError(
                    "already holds a bundle; pass {force} to replace it",
                    field="output",
                    value=output,
                    mentions=("force",),
                )
        elif any(output.iterdir()):
            raise BundleError(
                "exists, is not empty and holds no bundle; choose a new or empty directory",
                field="output",
                value=output,
            )
    parent = output.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create parent directory ({exc.strerror})", field="output", value=output) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"parent directory {parent} is not writable", field="output", value=output)


def resolve_lpwca(mode: str, backend: str, config: ModelConfig, contract: bool = True) -> tuple[str, str]:
    """(portable | fused | none, why): ``auto`` fuses for TensorRT, stays portable for ONNX Runtime.
    ``contract``: the CCRA module declares it computes ``ccra::LPWCA`` (a plug-in that does not
    exports portable, and ``fused`` with it is refused)."""
    if mode not in LPWCA_MODES:
        raise ConfigError(f"expected one of {', '.join(LPWCA_MODES)}", field="lpwca", value=mode)
    if config.ccra is None:
        if mode == "fused":
            raise ConfigError(
                "this model is the plain LLaVA-1.5 variant and has no LPWCA stage", field="lpwca", value="fused"
            )
        return "none", "plain variant: no LPWCA stage"
    if not contract:
        if mode == "fused":
            raise ConfigError(
                f"the CCRA module {config.ccra.module_path} does not declare the LPWCA contract "
                "(lpwca_contract = True); it exports as standard ONNX ops ({lpwca} portable)",
                field="lpwca",
                value="fused",
                mentions=("lpwca",),
            )
        return "portable", f"the CCRA module {config.ccra.module_path} does not declare the LPWCA contract"
    if mode != "auto":
        return mode, f"--lpwca {mode}"
    if backend == "trt":
        return "fused", "auto: TensorRT runs ccra::LPWCA as one plugin node"
    if backend == "ort-trt":  # ORT's TensorRT provider maps no IPluginV3 node (docs/tensorrt.md)
        return "portable", "auto: ONNX Runtime's TensorRT provider cannot run the plugin node"
    return "portable", (
        "auto: ONNX Runtime runs the decomposed graph with its own kernels; "
        "--lpwca fused runs the node there through the C++ CPU kernel"
    )


def _declares_lpwca(source: Source) -> bool:
    from ccra_export.model.ccra_plugin import declares_lpwca_contract  # torch: the [export] extra

    return source.model.ccra is None or declares_lpwca_contract(source.model.ccra)


def _plugin_record(lpwca: str, plugin_library: Path | None) -> PluginRecord | None:
    """What the TensorRT parser needs to find for a fused graph, and the libraries' hashes."""
    if lpwca != "fused":
        return None
    cpu = library_path()
    trt_library = None
    if plugin_library is not None:
        check_plugin_library(plugin_library)
        trt_library = LibraryRecord(file=Path(plugin_library).name, sha256=sha256_file(plugin_library))
    return PluginRecord(
        node=f"{lpwca_schema.DOMAIN}::{lpwca_schema.OP_TYPE}",
        plugin_name=lpwca_schema.OP_TYPE,
        plugin_version=lpwca_schema.PLUGIN_VERSION,
        plugin_namespace=lpwca_schema.PLUGIN_NAMESPACE,
        cpu_kernel_library=LibraryRecord(file=cpu.name, sha256=sha256_file(cpu)),
        tensorrt_plugin_library=trt_library,
    )


def build_bundle(options: BuildOptions, steps: Steps = SILENT) -> BuildResult:
    """Export, check, run and parity-check the vision graph; write the bundle atomically."""
    if options.precision not in PRECISIONS:
        raise ConfigError(f"expected one of {', '.join(PRECISIONS)}", field="precision", value=options.precision)
    require_export_stack("ccra-export build")
    output = Path(options.output)
    if Path(options.model).is_dir():  # a checkpoint directory: --force must never replace it
        atomic.refuse_overlap(output, "output", "write the bundle somewhere else", checkpoint=options.model)
    _check_output_dir(output, options.force)
    backend_kind, backend_reason = resolve_backend(options.backend)  # before any slow work
    if options.lm_precision and options.model in PRESETS:
        raise ConfigError(
            "{lm_precision} needs a checkpoint directory: presets have no language model or tokenizer",
            mentions=("lm_precision",),
        )
    language_model.check_decoder(
        options.model, options.lm_precision, options.lm_device, backend_kind, options.lm_decoder, options.lm_quant
    )
    source = resolve_source(
        options.model,
        random_weights=options.random_weights,
        seed=options.seed,
        plain=options.plain,
        steps=steps,
        language_model=language_model_request(options.lm_precision, options.lm_device, backend_kind),
        ccra_module=options.ccra_module,
    )
    processor = quantization.processor_for(source, options.int8.pad_to_square)  # preprocessor_config.json, checked now

    int8 = options.precision == "int8"
    for flag, value in (("--calib-data", options.int8.calib_data), ("--prompts", options.int8.prompts)):
        if not int8 and value is not None:
            steps.warn(f"{flag} {value}: ignored; INT8 calibration applies to --precision int8 only")
    lpwca, lpwca_reason = resolve_lpwca(options.lpwca, backend_kind, source.config, _declares_lpwca(source))
    if int8 and lpwca == "fused":
        if options.lpwca == "fused":
            raise ConfigError(
                "{precision} int8 with {lpwca} fused: ONNX Runtime's calibrator opens its own session, which cannot "
                "load the ccra::LPWCA custom op; use {lpwca} portable (TensorRT runs the Q/DQ graph as it is)",
                mentions=("precision", "lpwca"),
            )
        lpwca, lpwca_reason = "portable", "auto: INT8 calibrates the portable graph"
    if lpwca != "none":
        steps.info(f"LPWCA: {lpwca} ({lpwca_reason})")
    if options.split_vision and source.config.ccra is None:
        raise ConfigError(
            "this model is the plain LLaVA-1.5 variant; its vision graph has no text-conditioned "
            "head to split off (the whole graph runs once per image already)",
            field="split_vision",
        )
    split = source.config.ccra is not None if options.split_vision is None else options.split_vision
    parts = graph_parts(ccra=source.config.ccra is not None, split=split, attention=source.model.provides_attention)
    plugin = _plugin_record(lpwca, options.plugin_library)
    if backend_kind == "trt" and plugin and not options.plugin_library:
        raise ConfigError(
            "{lpwca} fused with {backend} trt needs {plugin_library}, the plugin library built for this machine",
            mentions=("lpwca", "backend", "plugin_library"),
            remedy=Remedy("plugins build"),
        )
    dynamic_axes = profile_axes(
        has_text=source.config.ccra is not None,
        **dataclasses.asdict(options.profile),
    )
    calibration = quantization.prepare(options.int8, source, options.seed, steps) if int8 else None
    try:
        with (
            atomic.staged_directory(output, replace=options.force) as stage,
            atomic.scratch_directory(output, "fp32") as scratch,
        ):
            feeds, described, title = parity_inputs(source, options.parity, calibration)
            _check_parity_fits_profile(feeds, dynamic_axes, held_out=int8)
            part_feeds = split_feeds(source, parts, feeds)
            written = [
                _write_graph(stage, Path(scratch), source, part, lpwca, calibration, options, part_feeds, steps)
                for part in parts
            ]
            with steps.step("onnx.checker full check and shape inference"):
                interfaces = [graph_interface(check_graph(stage / part.file)) for part in parts]
            backend, engine = _open_backend(
                stage, parts, backend_kind, backend_reason, interfaces, dynamic_axes, plugin, options, steps
            )
            limits = thresholds(options.precision, options.parity)
            with steps.step(title):
                reference = pytorch_outputs(source, feeds)
                report = run_parity(backend, options.precision, limits, feeds, reference, described)
                report.graphs = graph_parity(source, backend, parts, part_feeds, limits)
                report.fp16_kept_fp32 = _joined([w.fp16_kept_fp32 for w in written])
            if options.precision == "fp16":
                with steps.step("FP16 arithmetic, emulated (the PyTorch reference in half on the CPU)"):
                    fp32_modules = [m for m in STAGE_SCOPES if any(m in w.fp32_modules for w in written)]
                    report.emulated_fp16, failures = emulated_fp16(
                        source, feeds, reference, limits, fp32_modules=fp32_modules
                    )
                report.extra_failures += failures
            recorded = record_reference(stage / REFERENCE_FILE, feeds, reference)
            if int8:
                with steps.step(f"Per-layer drift, INT8 vs FP32 graph{'s' if len(parts) > 1 else ''}"):
                    report.layers, report.first_drift = per_layer_drift_chain(
                        [(w.fp32_graph, stage / w.part.file) for w in written], feeds
                    )
            lm_record = _add_language_model(stage, Path(scratch), source, report, options, backend_kind, steps)
            atomic.write_json(stage / PARITY_NAME, report.to_dict())
            files = [
                *(name for w in written for name in w.files),
                REFERENCE_FILE,
                *(engine_files(engine) if engine else []),
                *(lm_record["files"] if lm_record else []),
            ]
            config = source.config
            manifest = new_manifest(
                model=manifest_record(ModelRecord, config.to_dict(), "model"),
                variant=config.variant,
                ccra_parameters=sum(p.numel() for p in source.model.ccra.parameters()) if config.ccra else 0,
                source=manifest_record(SourceRecord, source.record, "source"),  # type: ignore[arg-type]
                precision=options.precision,
                export=_export_record(source, options, lpwca, interfaces),
                graph=_graph_record(written, interfaces),
                dynamic_axes=dynamic_axes,
                files=file_entries(stage, files),
                backend=BackendRecord(name=backend.name, description=backend.description),
                parity=ParityRecord(
                    file=PARITY_NAME,
                    passed=report.passed,
                    thresholds=ThresholdsRecord(**dataclasses.asdict(limits)),  # the schema checks its keys
                ),
                reference=ReferenceRecord(file=REFERENCE_FILE, samples=recorded, inputs=described),
                engine=engine,
                plugin=plugin,
                calibration=_calibration_record(written),
                language_model=lm_record,
                image_processor=quantization.processor_record(processor),
            )
            write_manifest(stage, manifest)
    except OSError as exc:
        raise BundleError(f"cannot write the bundle ({exc.strerror or exc})", field="output", value=output) from None
    return BuildResult(output, manifest, report)


def _check_parity_fits_profile(
    feeds: dict[str, Any], dynamic_axes: dict[str, AxisRange], held_out: bool = False
) -> None:
    """The recorded reference must run on the bundle's own profile (an engine is built for it):
    refuse parity inputs larger than the profile's maximum before anything is exported.
    ``held_out``: INT8, whose parity batch is its held-out images."""
    shapes = {"batch": ("pixel_values", 0, "holdout" if held_out else "parity_batch", "max_batch")}
    shapes["text_len"] = ("text_mask", 1, "parity_text_len", "max_text_len")
    for axis, (name, dim, given, limit) in shapes.items():
        if name in feeds and axis in dynamic_axes and feeds[name].shape[dim] > dynamic_axes[axis]["max"]:
            raise ConfigError(
                f"{feeds[name].shape[dim]} exceeds the profile's {{{limit}}} {dynamic_axes[axis]['max']}; "
                "the bundle's engine could not run its recorded reference: lower it or raise the maximum",
                field=given,
                mentions=(limit,),
            )


@dataclass
class _WrittenGraph:
    part: GraphPart
    graph_files: list[str]  # the graph, then its external data
    files: list[str]  # everything written (graph files and INT8 caches)
    calibration: tuple[CalibrationSettings, QuantizedGraph] | None = None  # INT8: shared, then this graph's
    fp32_graph: Path | None = None  # INT8: the FP32 graph it was quantized from (scratch)
    fp16_kept_fp32: list[KeptFP32] | None = None  # FP16: over-range tensors kept FP32
    fp32_modules: list[str] = field(default_factory=list)  # FP16: model stages holding FP32 nodes


def _joined(lists: list[list[KeptFP32] | None]) -> list[KeptFP32] | None:
    if all(item is None for item in lists):
        return None
    return [row for rows in lists for row in rows or []]


def _write_graph(
    stage: Path,
    scratch: Path,
    source: Source,
    part: GraphPart,
    lpwca: str,
    calibration: Any,
    options: BuildOptions,
    part_feeds: dict[str, dict[str, Any]],
    steps: Steps,
) -> _WrittenGraph:
    """Export one graph (the single graph, the tower or CCRA's head) to ONNX and write it in the
    bundle's precision (FP32, FP16, or calibrated INT8)."""
    from ccra_export.export.onnx_export import export_model_proto, save_model  # torch: the [export] extra

    feeds = part_feeds[part.name]
    fused = lpwca == "fused" and part.name != TOWER.name
    what = "" if part.name == "vision" else f" {part.name}"
    with steps.step(
        f"Exporting {source.config.name}{what} to ONNX (opset {options.opset}, dynamic batch"
        f"{', LPWCA fused' if fused else ''})"
    ):
        proto = export_model_proto(source.model, opset=options.opset, lpwca="fused" if fused else "portable", part=part)
    kept: list[KeptFP32] | None = None
    fp32_modules: list[str] = []
    fp32_graph = scratch / part.file
    if options.precision == "fp16":
        with steps.step(f"FP32 activation ranges of {part.file} on the parity inputs (what FP16 cannot hold)"):
            save_model(proto, fp32_graph, options.external_data)
            over = over_range(proto, activation_ranges(fp32_graph, feeds))
        kept = [o.to_dict(graph=part.file if what else None) for o in over]
        keep_nodes = [node for o in over for node in o.nodes]
        present = {scope for scope in STAGE_SCOPES if nodes_in_scope(proto, scope)}
        fp32_modules = [
            scope
            for scope in STAGE_SCOPES
            if scope in present
            and ((scope == "ccra" and not options.ccra_fp16) or set(keep_nodes) & set(nodes_in_scope(proto, scope)))
        ]
        note = f", {len(keep_nodes)} nodes around {len(over)} over-range tensors" if over else ""
        with steps.step(f"Converting {part.file} to FP16 (Softmax and the CCRA module kept FP32{note})"):
            proto = convert_to_fp16(proto, keep_ccra_fp32=not options.ccra_fp16, keep_nodes=keep_nodes)
    if options.precision != "int8":
        with steps.step(f"Writing {part.file}"):
            graph_files = save_model(proto, stage / part.file, options.external_data)
        return _WrittenGraph(part, graph_files, list(graph_files), fp16_kept_fp32=kept, fp32_modules=fp32_modules)
    save_model(proto, fp32_graph, options.external_data)  # kept aside for the per-layer drift report
    del proto
    transform = quantization.part_inputs(part, scratch / TOWER.file)
    cache = quantization.ORT_CACHE if part.name == "vision" else f"{part.name}.{quantization.ORT_CACHE}"
    graph_files, settings, quantized = quantization.quantize(
        fp32_graph, stage, part.file, calibration, options.int8, steps, transform=transform, ort_cache=cache
    )
    return _WrittenGraph(part, graph_files, [*graph_files, cache], (settings, quantized), fp32_graph)


def _calibration_record(written: list[_WrittenGraph]) -> CalibrationRecord | None:
    """INT8: what the graphs were calibrated with (the first graph's record), and each graph's own
    counts and range cache under ``parts``, in the graphs' order."""
    if written[0].calibration is None:
        return None
    parts = [CalibrationPartRecord(part=w.part.name, **w.calibration[1]) for w in written if w.calibration is not None]
    return CalibrationRecord(**written[0].calibration[0], parts=parts)


def _open_backend(
    stage: Path,
    parts: tuple[GraphPart, ...],
    kind: str,
    reason: str,
    interfaces: list[GraphInterface],
    dynamic_axes: dict[str, AxisRange],
    plugin: PluginRecord | None,
    options: BuildOptions,
    steps: Steps,
) -> tuple[Any, EngineRecord | None]:
    """The backend that runs the bundle's graph(s) for parity, and the engine record when TensorRT
    built them (one engine per graph; a split bundle's record lists both)."""
    library = options.plugin_library if plugin else None  # build_bundle checked it is given for TensorRT
    runners: list[Any] = []
    records: list[EngineBuild] = []
    for part, interface in zip(parts, interfaces, strict=True):
        profile = optimization_profiles(interface["inputs"], dynamic_axes)
        part_library = library if part.name != TOWER.name else None  # the tower has no LPWCA node
        if kind == "trt":
            runner, record = build_trt_engine(
                stage / part.file,
                stage / part.engine_file,
                options.precision,
                profile,
                part_library,
                options.trt,
                steps,
            )
            runners.append(runner)
            records.append(record)
            continue
        with steps.step(f"Creating the runtime session for {part.file}"):
            ort_options = {}
            if kind == "ort-trt":
                ort_options = ort_trt.session_options(
                    stage,
                    options.precision,
                    profile,
                    part_library,
                    workspace_mib=options.trt.workspace_mib,
                    optimization_level=options.trt.optimization_level,
                )
            ort_options.setdefault("providers", default_ort_providers(options.precision))
            runner, _ = select_backend(kind, stage / part.file, **ort_options)
            runners.append(runner)
    backend = join_parts(runners)
    line = f"backend: {backend.description}"
    steps.info(f"{line} ({reason})" if reason else line)
    engine = join_engine_records(parts, records) if records else None
    return backend, engine


def _add_language_model(
    stage: Path,
    scratch: Path,
    source: Source,
    report: ParityReport,
    options: BuildOptions,
    backend_kind: str,
    steps: Steps,
) -> LanguageModelRecord | None:
    """``--lm-precision``: the decoder and embedding model into the bundle, their parity into the report."""
    if not options.lm_precision:
        return None
    device, why = language_model.resolve_device(options.lm_device, backend_kind)
    steps.info(f"language model device: {device} ({why})")
    exported = language_model.export_into(
        Path(source.record["path"]),
        stage,
        scratch,
        options.lm_precision,
        device,
        steps,
        options.lm_quant,
        options.lm_decoder,
    )
    figures = language_model.parity(exported.hf_dir, stage / "lm", options.lm_precision, device, steps)
    report.language_model = figures
    report.extra_failures += lm_parity.failures(options.lm_precision, figures) + exported.failures
    evaluation = record_evaluation_set(Path(source.record["path"]), stage, steps)  # `eval` without PyTorch
    written = sorted(str(p.relative_to(stage)) for p in (stage / EVAL_DIR).rglob("*") if p.is_file())
    return LanguageModelRecord(  # precision and device: the flags' choices, checked by the schema on write
        precision=exported.precision,  # type: ignore[typeddict-item]
        device=exported.device,  # type: ignore[typeddict-item]
        image_token_id=exported.image_token_id,
        template=exported.template,
        files=sorted({*exported.files, lm_parity.LM_REFERENCE_FILE, *written}),
        evaluation=evaluation,
        **({"quant": LMQuantRecord(**dataclasses.asdict(exported.quant))} if exported.quant else {}),
        **({"decoder": exported.decoder} if exported.decoder else {}),
        parity=LanguageModelParity(
            ran_on=figures["ran_on"],  # type: ignore[typeddict-item]  # "cpu" or "cuda": runnable_device
            first_token_logits=figures["first_token_logits"],
            tokens=figures["tokens"],
        ),
    )


def _graph_record(written: list[_WrittenGraph], interfaces: list[GraphInterface]) -> GraphRecord:
    """The manifest's ``graph``: the vision stage as a whole (the first graph's inputs and the later
    graphs' own, besides the tower's features; the last graph's outputs) and each graph's record."""
    inputs = [*interfaces[0]["inputs"]]
    inputs += [spec for interface in interfaces[1:] for spec in interface["inputs"] if spec["name"] != TOWER_FEATURES]
    parts = [
        GraphPartRecord(
            name=w.part.name,
            file=w.part.file,
            external_data=w.graph_files[1:],
            inputs=interface["inputs"],
            outputs=interface["outputs"],
        )
        for w, interface in zip(written, interfaces, strict=True)
    ]
    return GraphRecord(inputs=inputs, outputs=interfaces[-1]["outputs"], parts=parts)


def _export_record(source: Source, options: BuildOptions, lpwca: str, interfaces: list[GraphInterface]) -> ExportRecord:
    import torch

    config = source.config
    return ExportRecord(
        exporter=f"torch.onnx (dynamo) torch {torch.__version__}",
        opset=interfaces[0]["opset"],
        ir_version=interfaces[0]["ir_version"],
        ccra_fp32_in_fp16=not options.ccra_fp16 if options.precision == "fp16" else None,
        lpwca=lpwca,  # type: ignore[typeddict-item]  # resolve_lpwca: portable, fused or none
        split_vision=len(interfaces) > 1,
        ccra_module=config.ccra.module_path if config.ccra else None,
    )
