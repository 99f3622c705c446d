"""Run a native TensorRT engine (TensorRT 10 / 11 Python API) behind the vision-backend interface.

Imported only after ``tensorrt_status()`` said TensorRT imports and sees a GPU. Inference goes
through Polygraphy's ``TrtRunner`` (its own CUDA bindings: no torch and no pycuda on a Jetson).
A bundle's engine is refused, in one line, when this TensorRT or GPU cannot run it
(``engine_compat.check_engine``). Building engines is the engine stage's (``ccra_export.engine``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorrt as trt

from ccra_export.core.manifest_schema import EngineBuild
from ccra_export.core.platform import gpus
from ccra_export.core.plugin_library import check_plugin_library
from ccra_export.runtime.engine_compat import check_engine
from ccra_export.runtime.vision_backend import VisionBackend


class TensorRTBackend(VisionBackend):
    """A deserialized engine run through Polygraphy's TrtRunner."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, plugin_libraries: Sequence[Path] = ()) -> None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        for library in plugin_libraries:  # static-registration variant, for engines without serialized plugins
            ctypes.CDLL(str(check_plugin_library(library)))
        self._engine = EngineFromBytes(BytesFromPath(str(engine_path)))()
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


def load_bundle_engine(bundle: Path, engine: EngineBuild) -> TensorRTBackend:
    """The bundle's engine, after refusing one this TensorRT or GPU cannot run (one line)."""
    check_engine(engine, trt.__version__, (gpus() or [("", "unknown")])[0][1], None, str(bundle))
    return TensorRTBackend(Path(bundle) / engine["file"])
