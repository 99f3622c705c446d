""" "A compiled vision graph you can run": one small interface, several engines behind it.

ONNX Runtime is the embedded default (CPU execution provider everywhere; CUDA when the
onnxruntime-gpu build is installed). TensorRT is optional and imported lazily: where it is
absent, asking for it fails with one line that says so, never a traceback. No torch here.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ccra_export.errors import BackendUnavailableError, BundleError

BackendKind = Literal["auto", "ort", "trt", "ort-trt"]
BACKEND_KINDS: tuple[str, ...] = ("auto", "ort", "trt", "ort-trt")

ORT_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class VisionBackend(ABC):
    """Runs the vision graph: named numpy inputs in, named numpy outputs out."""

    #: short engine name recorded in manifests and parity reports
    name: str

    @property
    @abstractmethod
    def description(self) -> str:
        """One line for the terminal: engine, version, device."""

    @property
    @abstractmethod
    def input_dtypes(self) -> dict[str, np.dtype]:
        """dtype each graph input expects (float16 inputs for FP16 graphs)."""

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with ``feeds`` cast to the graph's input types; unknown names are an error."""
        dtypes = self.input_dtypes
        unknown = set(feeds) - set(dtypes)
        missing = set(dtypes) - set(feeds)
        if unknown or missing:
            raise ValueError(f"graph inputs are {sorted(dtypes)}; got {sorted(feeds)}")
        return self._run({k: np.ascontiguousarray(v, dtype=dtypes[k]) for k, v in feeds.items()})


@dataclass(frozen=True)
class _OrtInfo:
    version: str
    providers: tuple[str, ...]


def _ort_info() -> _OrtInfo:
    import onnxruntime as ort

    return _OrtInfo(ort.__version__, tuple(ort.get_available_providers()))


class OrtBackend(VisionBackend):
    """ONNX Runtime session over an ONNX file (external data next to it is found by ORT)."""

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        custom_op_libraries: Sequence[str | Path] = (),
        extra_outputs: Sequence[str] = (),
    ) -> None:
        import onnxruntime as ort

        from ccra_export.runtime.ort_session import session_model

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3  # errors only: ORT's warnings are about its own optimizers
        model, config, libraries = session_model(onnx_path, extra_outputs)  # fused graphs need the CPU kernel
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        for library in [*custom_op_libraries, *libraries]:
            options.register_custom_ops_library(str(library))
        chosen = list(providers) if providers else default_ort_providers()
        try:
            self.session = ort.InferenceSession(model, sess_options=options, providers=chosen)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{onnx_path}: ONNX Runtime cannot load the graph ({first})") from None
        self._dtypes = {i.name: np.dtype(ORT_NUMPY_TYPES[i.type]) for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def description(self) -> str:
        return f"ONNX Runtime {_ort_info().version} ({self.providers[0]})"

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        return dict(self._dtypes)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds), strict=True))


def default_ort_providers() -> list[str]:
    """CUDA first when this ONNX Runtime build has it, CPU always last."""
    available = _ort_info().providers
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


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
    if importlib.util.find_spec("polygraphy") is None:  # engines run through Polygraphy's TrtRunner
        return False, f"TensorRT {version} is installed but Polygraphy is not (pip install 'ccra-export[tensorrt]')"
    return True, f"TensorRT {version}"


def resolve_backend(kind: str) -> tuple[str, str]:
    """``--backend`` -> ``trt`` | ``ort`` | ``ort-trt``, and why (empty when the user named it)."""
    if kind not in BACKEND_KINDS:
        raise BackendUnavailableError(f"--backend {kind}: expected one of {', '.join(BACKEND_KINDS)}")
    if kind == "ort":
        return "ort", ""
    if kind == "ort-trt":
        if "TensorrtExecutionProvider" not in _ort_info().providers:
            raise BackendUnavailableError(
                "--backend ort-trt: this ONNX Runtime has no TensorrtExecutionProvider; install onnxruntime-gpu "
                "built with TensorRT (and only it), or use --backend trt / ort"
            )
        return "ort-trt", ""
    usable, reason = tensorrt_status()
    if usable:
        return "trt", reason
    if kind == "trt":
        raise BackendUnavailableError(f"--backend trt: {reason}; install TensorRT 10+ or use --backend ort")
    return "ort", f"auto: {reason}"


def select_backend(kind: str, onnx_path: str | Path, **ort_options: object) -> tuple[VisionBackend, str]:
    """An ONNX Runtime backend for ``kind`` (``ort``, or ``ort-trt`` with its provider options in
    ``ort_options['providers']``) and one line saying what runs it."""
    backend = OrtBackend(onnx_path, **ort_options)
    return backend, f"backend: {backend.description}"


def bundle_backend(
    bundle: str | Path, manifest: dict, backend: str = "auto", plugin_library: Path | None = None
) -> tuple[VisionBackend, str]:
    """What runs a built bundle's vision graph: its TensorRT engine when it has one and TensorRT is
    usable (after the engine compatibility check), ONNX Runtime's TensorRT provider for ``ort-trt``,
    else ONNX Runtime on its ONNX graph."""
    kind, reason = resolve_backend(backend)
    engine = manifest.get("engine")
    graph = Path(bundle) / manifest["graph"]["file"]
    if kind == "trt" and engine is not None:
        from ccra_export.runtime.trt_engine import load_bundle_engine

        runner = load_bundle_engine(Path(bundle), engine)
        return runner, f"backend: {runner.description}"
    if kind == "trt":
        if backend == "trt":
            raise BundleError(
                f"--bundle {bundle}: holds no TensorRT engine; build one with `ccra-export engine --bundle {bundle}`"
            )
        reason = "auto: the bundle holds no TensorRT engine"
    if kind == "ort-trt":
        from ccra_export.runtime import ort_trt

        return select_backend(kind, graph, **ort_trt.bundle_session_options(Path(bundle), manifest, plugin_library))
    runner, line = select_backend("ort", graph)
    return runner, f"{line} ({reason})" if reason else line
