"""Which vision backend runs a bundle (``--backend auto|ort|trt``), and opening it.

The interface and ONNX Runtime, the embedded default, are in vision_backend.py; the TensorRT
engine runner in trt_engine.py, imported only where TensorRT is usable: where it is absent,
asking for it fails with one line that says so, never a traceback. No torch here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

from ccra_export.core.errors import BackendUnavailableError, BundleError, Remedy
from ccra_export.core.extras import available, install_hint
from ccra_export.core.manifest_schema import Manifest
from ccra_export.core.vision_graphs import engine_records, part_records
from ccra_export.runtime.split_vision import SplitVision
from ccra_export.runtime.tower_cache import TowerCache
from ccra_export.runtime.vision_backend import OrtBackend, VisionBackend, available_providers, default_ort_providers

BackendKind = Literal["auto", "ort", "trt", "ort-trt"]
BACKEND_KINDS: tuple[str, ...] = ("auto", "ort", "trt", "ort-trt")


def tensorrt_status() -> tuple[bool, str]:
    """(usable, one-line reason): TensorRT imports and can see a GPU."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as exc:  # ImportError, or OSError from a missing libnvinfer
        return False, f"TensorRT is not installed (import tensorrt: {type(exc).__name__}: {exc})"
    version = getattr(trt, "__version__", "?")
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # no driver / no GPU
        return False, f"TensorRT {version} is installed but cannot create a builder ({exc})"
    if builder is None:
        return False, f"TensorRT {version} is installed but found no usable GPU"
    if not available("tensorrt"):  # engines run through Polygraphy's TrtRunner
        return False, f"TensorRT {version} is installed but Polygraphy is not ({install_hint('tensorrt')})"
    return True, f"TensorRT {version}"


def resolve_backend(kind: str) -> tuple[str, str]:
    """``--backend`` -> ``trt`` | ``ort`` | ``ort-trt``, and why (empty when the user named it)."""
    if kind not in BACKEND_KINDS:
        raise BackendUnavailableError(f"expected one of {', '.join(BACKEND_KINDS)}", field="backend", value=kind)
    if kind == "ort":
        return "ort", ""
    if kind == "ort-trt":
        if "TensorrtExecutionProvider" not in available_providers():
            raise BackendUnavailableError(
                "this ONNX Runtime has no TensorrtExecutionProvider; install onnxruntime-gpu built with TensorRT "
                "(and only it), or run the bundle on the trt or ort backend",
                field="backend",
                value=kind,
            )
        return "ort-trt", ""
    usable, reason = tensorrt_status()
    if usable:
        return "trt", reason
    if kind == "trt":
        raise BackendUnavailableError(
            f"{reason}; install TensorRT 10+ or run the bundle on the ort backend", field="backend", value=kind
        )
    return "ort", f"auto: {reason}"


def select_backend(kind: str, onnx_path: str | Path, **ort_options: object) -> tuple[VisionBackend, str]:
    """An ONNX Runtime backend for ``kind`` (``ort``, or ``ort-trt`` with its provider options in
    ``ort_options['providers']``) and one line saying what runs it."""
    backend = OrtBackend(onnx_path, **ort_options)
    return backend, f"backend: {backend.description}"


def bundle_backend(
    bundle: str | Path,
    manifest: Manifest,
    backend: str = "auto",
    *,
    tower_cache: TowerCache | None = None,
    plugin_library: Path | None = None,
) -> tuple[VisionBackend, str]:
    """What runs a built bundle's vision graph: its TensorRT engine when it has one and TensorRT is
    usable (after the engine compatibility check), else ONNX Runtime on its ONNX graph. A split
    bundle opens its tower and head that way and joins them (``SplitVision``) with ``tower_cache``.
    ``plugin_library``: the installed LPWCA plugin a fused engine needs (default:
    ``CCRA_LPWCA_PLUGIN_LIBRARY``), loaded only once its hash matches the engine record.

    ONNX Runtime's TensorRT provider (``ort-trt``) builds engines, so it is opened by the engine
    stage (``ccra_export.engine.ort_trt.bundle_backend``), not here.
    """
    kind, reason = resolve_backend(backend)
    if kind == "ort-trt":
        raise BackendUnavailableError(
            "ONNX Runtime's TensorRT provider is opened by ccra_export.engine.ort_trt.bundle_backend",
            field="backend",
            value=kind,
        )
    engines = engine_records(manifest)
    if kind == "trt" and engines:
        from ccra_export.runtime.trt_engine import load_bundle_engine  # imports tensorrt: only where it is usable

        runners = [
            load_bundle_engine(Path(bundle), engines[part["name"]], plugin_library) for part in part_records(manifest)
        ]
        runner = join_parts(runners, tower_cache)
        return runner, f"backend: {runner.description}"
    if kind == "trt":
        if backend == "trt":
            raise BundleError(
                "holds no TensorRT engine; build one on this GPU",
                field="bundle",
                value=bundle,
                remedy=Remedy("engine", (("bundle", bundle),)),
            )
        reason = "auto: the bundle holds no TensorRT engine"
    providers = default_ort_providers(manifest.get("precision"))
    runners = [OrtBackend(Path(bundle) / part["file"], providers=providers) for part in part_records(manifest)]
    runner = join_parts(runners, tower_cache)
    line = f"backend: {runner.description}"
    return runner, f"{line} ({reason})" if reason else line


def join_parts(runners: list[VisionBackend], tower_cache: TowerCache | None = None) -> VisionBackend:
    """One backend for a bundle's graphs: the single graph itself, or tower + head joined."""
    if len(runners) == 1:
        return runners[0]
    tower, head = runners
    return SplitVision(tower, head, tower_cache)
