"""Opening a built bundle's vision backend, or its whole pipeline, for every `--backend` a verb
offers (`check`, `run`, `bench`).

``auto``, ``ort`` and ``trt`` are the runtime's (what a target runs); ``ort-trt``, ONNX Runtime's
TensorRT execution provider, builds its engines as it opens, so it comes from the engine stage.
"""

from __future__ import annotations

from pathlib import Path

from ccra_export.core.errors import BackendUnavailableError
from ccra_export.core.manifest import read_manifest, verify_files
from ccra_export.core.manifest_schema import Manifest
from ccra_export.engine import ort_trt
from ccra_export.runtime.backends import bundle_backend, resolve_backend
from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB, TowerCache
from ccra_export.runtime.vision_backend import VisionBackend
from ccra_export.runtime.vlm_pipeline import Pipeline


def open_bundle_backend(
    bundle: str | Path,
    manifest: Manifest,
    backend: str = "auto",
    plugin_library: Path | None = None,
    tower_cache: TowerCache | None = None,
) -> tuple[VisionBackend, str]:
    """The backend that runs ``bundle``'s vision graph(s), and one line saying what it is;
    ``tower_cache`` serves a split bundle's tower outputs."""
    if backend == "ort-trt":
        resolve_backend(backend)  # one line when this ONNX Runtime has no TensorRT provider
        runner, line = ort_trt.bundle_backend(Path(bundle), manifest, plugin_library, tower_cache)
        started = getattr(runner, "providers", [ort_trt.PROVIDER])
        if not started or started[0] != ort_trt.PROVIDER:  # ORT falls back to CUDA/CPU with a log line only
            raise BackendUnavailableError(
                f"this ONNX Runtime lists {ort_trt.PROVIDER} but could not start it (the session "
                f"runs on {', '.join(started) or 'nothing'}: TensorRT's libraries, libnvinfer, missing or not the "
                "version this onnxruntime-gpu was built for); install them, or use {backend} ort / trt",
                field="backend",
                value="ort-trt",
                mentions=("backend",),
            )
        return runner, line
    return bundle_backend(bundle, manifest, backend, tower_cache=tower_cache, plugin_library=plugin_library)


def open_pipeline(
    bundle: str | Path,
    backend: str = "auto",
    verify: bool = False,
    plugin_library: Path | None = None,
    tower_cache_mib: float = DEFAULT_TOWER_CACHE_MIB,
    context: int | None = None,
) -> Pipeline:
    """``Pipeline.from_bundle`` for every ``--backend``, the vision backend opened here (with the
    installed ``plugin_library`` a fused engine needs, hash-checked against its record) after the
    checks that need no engine (a language model in the bundle, ``verify``'s hashes)."""
    manifest = read_manifest(bundle)
    if not manifest.get("language_model"):
        return Pipeline.from_bundle(bundle, backend=backend)  # refuses it in its one line
    if verify:
        verify_files(bundle, manifest)
    vision, _ = open_bundle_backend(bundle, manifest, backend, plugin_library, TowerCache.from_mib(tower_cache_mib))
    return Pipeline.from_bundle(bundle, vision=vision, context=context)
