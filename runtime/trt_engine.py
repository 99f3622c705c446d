"""Run a native TensorRT engine (TensorRT 10 / 11 Python API) behind the vision-backend interface.

Imported only after ``tensorrt_status()`` said TensorRT imports and sees a GPU. Inference goes
through Polygraphy's ``TrtRunner`` (its own CUDA bindings: no torch and no pycuda on a Jetson).
A bundle's engine is refused, in one line, when this TensorRT or GPU cannot run it
(``engine_compat.check_engine``). Building engines is the engine stage's (``ccra_export.engine``).

What opening an engine trusts: the engine is native code TensorRT compiled for this GPU, run as
it is; a fused engine's plugin library is native code too, and only the installed library whose
sha256 the engine record names is loaded (``engine_compat.engine_plugin``), never one carried in
the bundle. The runtime is deserialised with ``engine_host_code_allowed`` off (TensorRT's default,
NvInferRuntime.h IRuntime::setEngineHostCodeAllowed), which Polygraphy's ``EngineFromBytes`` turns
on: an engine carrying host code (a serialised plugin library or lean runtime) is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorrt as trt

from ccra_export.core.errors import BundleError
from ccra_export.core.manifest_schema import EngineBuild
from ccra_export.core.platform import gpus
from ccra_export.runtime.engine_compat import PLUGINS, check_engine, engine_plugin, installed_plugin_library
from ccra_export.runtime.vision_backend import VisionBackend


def load_plugin(plugin: tuple[Path, str] | None) -> None:
    """Register a checked (library, sha256) in TensorRT's plugin registry, once per process."""
    if plugin is not None:
        PLUGINS.load(trt.get_plugin_registry(), *plugin)


class TensorRTBackend(VisionBackend):
    """A deserialized engine run through Polygraphy's TrtRunner."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, plugin: tuple[Path, str] | None = None) -> None:
        """``plugin``: the (library, sha256) ``engine_compat.engine_plugin`` accepted for this engine."""
        from polygraphy.backend.trt import TrtRunner

        load_plugin(plugin)  # before deserialising: the engine's plugin layer looks its creator up
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._runtime.engine_host_code_allowed = False  # no code from the engine file but TensorRT's kernels
        self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self._engine is None:
            raise BundleError(f"{engine_path}: TensorRT could not deserialise the engine (its log above says why)")
        self._runner = TrtRunner(self._engine)
        self._runner.activate()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._dtypes = {
            n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n)))
            for n in names
            if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        }

    @property
    def description(self) -> str:
        return f"TensorRT {trt.__version__} engine"

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        return dict(self._dtypes)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self._runner.infer(feeds).items()}


def load_bundle_engine(bundle: Path, engine: EngineBuild, plugin_library: Path | None = None) -> TensorRTBackend:
    """The bundle's engine, after refusing one this TensorRT, GPU or plugin library cannot run (one
    line); ``plugin_library``: the installed LPWCA library (default: ``CCRA_LPWCA_PLUGIN_LIBRARY``)."""
    plugin = engine_plugin(engine, installed_plugin_library(plugin_library), str(bundle))
    compute_capability = (gpus() or [("", "unknown")])[0][1]
    check_engine(engine, trt.__version__, compute_capability, plugin[1] if plugin else None, str(bundle))
    return TensorRTBackend(Path(bundle) / engine["file"], plugin)
