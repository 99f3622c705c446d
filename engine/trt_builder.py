"""TensorRT builder calls (TensorRT 10 / 11 Python API). Thin by design.

Every decision (precision flags vs strong typing, profiles) is made in plan.py, which CI tests;
this module only turns those decisions into TensorRT calls, and is imported only after
``tensorrt_status()`` said TensorRT imports and sees a GPU. Polygraphy's
``CreateConfig(fp16=..., int8=...)`` relies on builder flags TensorRT 11 removed, so the builder
config is made here with the raw API instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tensorrt as trt

from ccra_export.core.errors import BundleError
from ccra_export.engine import timing_cache
from ccra_export.engine.plan import PrecisionPlan, Profile, pinned_layer
from ccra_export.engine.settings import TrtOptions
from ccra_export.runtime.trt_engine import load_plugin


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
    plugin: tuple[Path, str] | None = None,
    report: Callable[[str], None] | None = None,
    islands: frozenset[str] = frozenset(),
    node_names: frozenset[str] = frozenset(),
    *,
    cache_path: Path | None = None,
    warn: Callable[[str], None] = lambda line: None,
) -> bytes:
    """Parse the ONNX graph and build a serialized engine; reads and saves the timing cache at
    ``cache_path`` (the device-keyed file, ``timing_cache.keyed_path``), warning through ``warn``.
    ``islands``: with ``plan.pin_fp32``, the ONNX nodes (of ``node_names``) whose layers compute in FP32.

    ``plugin`` (library, sha256), checked by the caller, is loaded into the plugin registry once per
    process (``IPluginRegistry::loadLibrary``, getCreators) and stays registered: the engine is then
    deserialised in this process. It is not serialised into the engine: ``plugins_to_serialize`` is
    for version-compatible engines (NvInfer.h IBuilderConfig::setPluginsToSerialize), and a library
    inside a bundle would be native code a bundle could bring; the runtime loads the installed,
    hash-checked library instead (runtime/engine_compat.py).
    """
    load_plugin(plugin)
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
    _cache = timing_cache.attach(config, cache_path, warn)  # held to the end: it must outlive the build (NvInfer.h)
    if report is not None:
        config.progress_monitor = _Progress(report)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"{onnx_path}: TensorRT could not build an engine (its log above says why)")
    timing_cache.save(config, cache_path, warn)  # a failure is a warning: the engine is built
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
