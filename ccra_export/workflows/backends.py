"""Opening a built bundle's vision backend for every `--backend` a verb offers.

``auto``, ``ort`` and ``trt`` are the runtime's (what a target runs); ``ort-trt``, ONNX Runtime's
TensorRT execution provider, builds its engines as it opens, so it comes from the engine stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccra_export.engine import ort_trt
from ccra_export.runtime.backends import bundle_backend, resolve_backend
from ccra_export.runtime.vision_backend import VisionBackend


def open_bundle_backend(
    bundle: str | Path, manifest: dict[str, Any], backend: str = "auto", plugin_library: Path | None = None
) -> tuple[VisionBackend, str]:
    """The backend that runs ``bundle``'s vision graph, and one line saying what it is."""
    if backend == "ort-trt":
        resolve_backend(backend)  # one line when this ONNX Runtime has no TensorRT provider
        return ort_trt.bundle_backend(Path(bundle), manifest, plugin_library)
    return bundle_backend(bundle, manifest, backend)
