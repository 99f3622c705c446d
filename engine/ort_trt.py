"""ONNX Runtime's TensorRT execution provider: the second way to run a bundle on a GPU.

ORT builds and caches the TensorRT engine itself (``trt_engine_cache_path`` inside the bundle).
Option names follow ORT's TensorRT EP documentation; the profile strings are its
``name:d0xd1x...`` format. Two decisions, read from the provider's sources (docs/tensorrt.md has
the file and line of each):

- Precision comes from the graph, never from ``trt_fp16_enable`` / ``trt_int8_enable``. With either
  flag the provider builds a weakly typed network (``BuilderFlag::kFP16``), where TensorRT may run
  the FP32 islands of our FP16 and INT8 graphs (Softmax, the CCRA module) in FP16 (the overflow the
  native path avoids). Its only per-layer precision control is ``trt_layer_norm_fp32_fallback``
  (Pow + Reduce pairs), and ``trt_op_types_to_exclude`` moves whole op types off TensorRT. With
  neither flag, the provider creates the network ``kSTRONGLY_TYPED`` on TensorRT > 8
  (``CreateNodeComputeInfoFromGraph``): the ONNX graph's types are kept exactly, FP16 where the
  graph is FP16, FP32 islands FP32, INT8 where Q/DQ say, as ``--backend trt`` builds it.
- A fused graph (the ``ccra::LPWCA`` node) is refused: the provider hands TensorRT a plugin node
  only from its ``trt.plugins`` domain, fills that domain from ``getPluginCreatorList`` (IPluginV2
  creators; ours is IPluginV3, and TensorRT 11 removed that call) after loading
  ``trt_extra_plugin_lib_paths`` with a plain dlopen (static registration only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccra_export.core.manifest_schema import GraphPartRecord, Manifest
from ccra_export.core.vision_graphs import part_records
from ccra_export.engine.plan import Profile, optimization_profiles
from ccra_export.runtime.backends import join_parts
from ccra_export.runtime.tower_cache import TowerCache
from ccra_export.runtime.vision_backend import (
    TENSORRT_PROVIDER,
    OrtBackend,
    VisionBackend,
    cuda_provider_options,
    fused_graph_on_tensorrt_provider,
)

PROVIDER = TENSORRT_PROVIDER


def _shape_list(profile: Profile, index: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shapes[index]))}" for name, shapes in profile.shapes.items())


def provider_options(
    bundle: Path,
    precision: str,
    profile: Profile,
    *,
    workspace_mib: int = 2048,
    optimization_level: int = 3,
) -> dict[str, Any]:
    """The TensorRT provider's options for a graph of ``precision`` (recorded in the engine cache's
    name only: the graph's own types decide, strongly typed, see the module docstring)."""
    del precision  # the graph carries it; the flags would make TensorRT ignore its FP32 islands
    return {
        "trt_fp16_enable": False,
        "trt_int8_enable": False,  # Q/DQ graph: explicit quantization, strongly typed
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(Path(bundle) / "ort_trt_cache"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(Path(bundle) / "ort_trt_cache"),  # ORT names it by compute capability
        "trt_builder_optimization_level": optimization_level,
        "trt_max_workspace_size": workspace_mib << 20,
        "trt_profile_min_shapes": _shape_list(profile, 0),
        "trt_profile_opt_shapes": _shape_list(profile, 1),
        "trt_profile_max_shapes": _shape_list(profile, 2),
    }


def providers(options: dict[str, Any], precision: str | None = None) -> list[Any]:
    """TensorRT first, CUDA for what TensorRT does not take (TF32 off for FP32), CPU last."""
    return [(PROVIDER, options), ("CUDAExecutionProvider", cuda_provider_options(precision)), "CPUExecutionProvider"]


def session_options(
    bundle: Path, precision: str, profile: Profile, plugin_library: Path | None = None, **settings: Any
) -> dict[str, Any]:
    """``OrtBackend`` keyword arguments: the TensorRT provider (then CUDA, CPU) for a bundle's graph.
    ``plugin_library`` is given for a fused graph only, which this provider cannot run: refused."""
    if plugin_library is not None:
        raise fused_graph_on_tensorrt_provider(bundle)
    return {"providers": providers(provider_options(bundle, precision, profile, **settings), precision)}


def refuse_fused(manifest: Manifest, bundle: Path) -> None:
    """One line, before any session is made, for a bundle whose graph has the fused node."""
    if manifest.get("plugin"):
        raise fused_graph_on_tensorrt_provider(bundle)


def bundle_session_options(
    bundle: Path,
    manifest: Manifest,
    plugin_library: Path | None = None,
    *,
    part: GraphPartRecord | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """``OrtBackend`` keyword arguments for a built bundle's graph (``part``: one graph of a split
    bundle): its precision and the profile its manifest records. A fused graph is refused in one
    line (``plugin_library`` is accepted for the callers that pass it, and unused)."""
    del plugin_library  # this provider cannot load the IPluginV3 library (module docstring)
    refuse_fused(manifest, bundle)
    part = part or part_records(manifest)[0]
    profile = optimization_profiles(part["inputs"], manifest["dynamic_axes"])
    return session_options(bundle, manifest["precision"], profile, **settings)


def bundle_backend(
    bundle: Path, manifest: Manifest, plugin_library: Path | None = None, tower_cache: TowerCache | None = None
) -> tuple[VisionBackend, str]:
    """A built bundle's graph(s) on ONNX Runtime's TensorRT provider, and one line saying so."""
    refuse_fused(manifest, bundle)
    runners = [
        OrtBackend(Path(bundle) / part["file"], **bundle_session_options(bundle, manifest, plugin_library, part=part))
        for part in part_records(manifest)
    ]
    runner = join_parts(runners, tower_cache)
    return runner, f"backend: {runner.description}"


__all__ = [
    "PROVIDER",
    "bundle_backend",
    "bundle_session_options",
    "provider_options",
    "providers",
    "refuse_fused",
    "session_options",
]
