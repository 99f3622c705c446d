"""ONNX Runtime's TensorRT execution provider: the second way to run a bundle on a GPU.

ORT builds and caches the TensorRT engine itself (``trt_engine_cache_path`` inside the bundle)
and loads the LPWCA plugin through ``trt_extra_plugin_lib_paths``. Option names follow ORT's
TensorRT EP documentation; the profile strings are its ``name:d0xd1x...`` format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccra_export.core.errors import BundleError, Remedy
from ccra_export.core.manifest_schema import GraphPartRecord, Manifest
from ccra_export.core.plugin_library import check_plugin_library
from ccra_export.core.vision_graphs import part_records
from ccra_export.engine.plan import Profile, optimization_profiles
from ccra_export.runtime.backends import join_parts
from ccra_export.runtime.tower_cache import TowerCache
from ccra_export.runtime.vision_backend import OrtBackend, VisionBackend, cuda_provider_options

PROVIDER = "TensorrtExecutionProvider"


def _shape_list(profile: Profile, index: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shapes[index]))}" for name, shapes in profile.shapes.items())


def provider_options(
    bundle: Path,
    precision: str,
    profile: Profile,
    *,
    plugin_library: Path | None = None,
    workspace_mib: int = 2048,
    optimization_level: int = 3,
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "trt_fp16_enable": precision in ("fp16", "int8"),
        "trt_int8_enable": precision == "int8",  # Q/DQ graph: explicit quantization, no calibration table
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(Path(bundle) / "ort_trt_cache"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(Path(bundle) / "ort_trt_cache"),
        "trt_builder_optimization_level": optimization_level,
        "trt_max_workspace_size": workspace_mib << 20,
        "trt_profile_min_shapes": _shape_list(profile, 0),
        "trt_profile_opt_shapes": _shape_list(profile, 1),
        "trt_profile_max_shapes": _shape_list(profile, 2),
    }
    if plugin_library is not None:
        options["trt_extra_plugin_lib_paths"] = str(plugin_library)
    return options


def providers(options: dict[str, Any], precision: str | None = None) -> list[Any]:
    """TensorRT first, CUDA for what TensorRT does not take (TF32 off for FP32), CPU last."""
    return [(PROVIDER, options), ("CUDAExecutionProvider", cuda_provider_options(precision)), "CPUExecutionProvider"]


def session_options(
    bundle: Path, precision: str, profile: Profile, plugin_library: Path | None = None, **settings: Any
) -> dict[str, Any]:
    """``OrtBackend`` keyword arguments: the TensorRT provider (then CUDA, CPU) for a bundle's graph."""
    return {
        "providers": providers(
            provider_options(bundle, precision, profile, plugin_library=plugin_library, **settings), precision
        )
    }


def bundle_session_options(
    bundle: Path,
    manifest: Manifest,
    plugin_library: Path | None = None,
    *,
    part: GraphPartRecord | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """``OrtBackend`` keyword arguments for a built bundle's graph (``part``: one graph of a split
    bundle): its precision and the profile its manifest records; a fused graph needs the plugin
    library built for this machine."""
    if manifest.get("plugin") and plugin_library is None:
        raise BundleError(
            "its graph has the fused ccra::LPWCA node; ONNX Runtime's TensorRT provider needs {plugin_library}",
            field="bundle",
            value=bundle,
            mentions=("plugin_library",),
            remedy=Remedy("plugins build"),
        )
    if plugin_library is not None:
        check_plugin_library(plugin_library)
    part = part or part_records(manifest)[0]
    profile = optimization_profiles(part["inputs"], manifest["dynamic_axes"])
    return session_options(bundle, manifest["precision"], profile, plugin_library, **settings)


def bundle_backend(
    bundle: Path, manifest: Manifest, plugin_library: Path | None = None, tower_cache: TowerCache | None = None
) -> tuple[VisionBackend, str]:
    """A built bundle's graph(s) on ONNX Runtime's TensorRT provider, and one line saying so."""
    runners = [
        OrtBackend(Path(bundle) / part["file"], **bundle_session_options(bundle, manifest, plugin_library, part=part))
        for part in part_records(manifest)
    ]
    runner = join_parts(runners, tower_cache)
    return runner, f"backend: {runner.description}"
