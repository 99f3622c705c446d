"""TensorRT builder calls (TensorRT 10 / 11 Python API). Thin by design.

Every decision (precision flags vs strong typing, profiles) is made in plan.py, which CI tests;
this module only turns those decisions into TensorRT calls, and is imported only after
``tensorrt_status()`` said TensorRT imports and sees a GPU. Polygraphy's
``CreateConfig(fp16=..., int8=...)`` relies on builder flags TensorRT 11 removed, so the builder
config is made here with the raw API instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import tensorrt as trt

from ccra_export.core.errors import BundleError
from ccra_export.engine.plan import PrecisionPlan, Profile, pinned_layer
from ccra_export.engine.settings import TrtOptions


class _Progress(trt.IProgressMonitor):
    """Forwards TensorRT's build phases to a callback (the CLI's progress line)."""

    def __init__(self, report: Callable[[str], None]) -> None:
        trt.IProgressMonitor.__init__(self)
        self._report = report

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        self._report(f"{phase_name} (0/{num_steps})")

    def step_complete(self, phase_name: str, step: int) -> bool:
        self._report(f"{phase_name} ({step + 1})")
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        self._report(f"{phase_name} done")


def build_engine(
    onnx_path: Path,
    plan: PrecisionPlan,
    profile: Profile,
    settings: TrtOptions,
    plugin_libraries: Sequence[Path] = (),
    report: Callable[[str], None] | None = None,
    islands: frozenset[str] = frozenset(),
    node_names: frozenset[str] = frozenset(),
) -> bytes:
    """Parse the ONNX graph and build a serialized engine; saves the timing cache for reuse.
    ``islands``: with ``plan.pin_fp32``, the ONNX nodes (of ``node_names``) whose layers compute in FP32.

    The plugin library is loaded for the build and deregistered after it: the engine carries its
    own copy (plugins_to_serialize), which deserialising it loads again, and one library's creators
    registered twice in a process collide (IPluginRegistry::loadLibrary / deregisterLibrary).
    """
    registry = trt.get_plugin_registry()
    handles = [registry.load_library(str(library)) for library in plugin_libraries]  # getCreators() variant
    try:
        return _build(onnx_path, plan, profile, settings, plugin_libraries, report, islands, node_names)
    finally:
        for handle in handles:
            registry.deregister_library(handle)


def _build(
    onnx_path: Path,
    plan: PrecisionPlan,
    profile: Profile,
    settings: TrtOptions,
    plugin_libraries: Sequence[Path],
    report: Callable[[str], None] | None,
    islands: frozenset[str],
    node_names: frozenset[str],
) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the graph
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise BundleError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[0] if errors else 'no reason given'}")
    if plan.pin_fp32:
        _pin_fp32(network, islands, node_names)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.cleared_flags:  # IBuilderConfig::clearFlag (NvInfer.h); TF32 is set by default
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    trt_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.shapes.items():
        trt_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(trt_profile)
    cache_path = settings.timing_cache
    cache = config.create_timing_cache(_read_cache(cache_path))
    config.set_timing_cache(cache, ignore_mismatch=False)
    if plugin_libraries:  # ship the plugin inside the engine: the runtime needs no library path
        config.plugins_to_serialize = [str(p) for p in plugin_libraries]
    if report is not None:
        config.progress_monitor = _Progress(report)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"{onnx_path}: TensorRT could not build an engine (its log above says why)")
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        except OSError as exc:  # the cache only saves time: an unwritable one must not cost the engine
            logger.log(trt.Logger.WARNING, f"timing cache {cache_path} not saved: {exc.strerror or exc}")
    return bytes(serialized)


def _pin_fp32(network: trt.INetworkDefinition, islands: frozenset[str], node_names: frozenset[str]) -> None:
    """Weak typing: the islands' layers compute and output FP32 (ILayer::setPrecision and
    setOutputType; honoured with BuilderFlag::kOBEY_PRECISION_CONSTRAINTS, set by the plan)."""
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if not pinned_layer(layer.name, islands, node_names):
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            if layer.get_output(output).dtype in (trt.float32, trt.float16):  # never shape or index tensors
                layer.set_output_type(output, trt.float32)


def _read_cache(path: Path | None) -> bytes:
    try:
        return path.read_bytes() if path is not None and path.is_file() else b""
    except OSError:
        return b""  # unreadable: start a fresh cache
