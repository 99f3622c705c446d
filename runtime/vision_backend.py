"""The interface of "a compiled vision graph you can run", and its embedded default: ONNX Runtime.

ONNX Runtime runs everywhere (CPU execution provider; CUDA when the onnxruntime-gpu build is
installed). Other engines (runtime/trt_engine.py) implement the same interface. No torch here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ccra_export.core.errors import BackendUnavailableError, BundleError, Remedy
from ccra_export.runtime.ort_session import import_onnxruntime, session_model

TENSORRT_PROVIDER = "TensorrtExecutionProvider"
#: ORT's exception classes (onnxruntime_pybind11_state) that mean the model bytes could not be read
#: as a graph; any other failure is a provider's or the session's, and its own message says which
_UNREADABLE_MODEL = frozenset({"InvalidProtobuf", "NoSuchFile", "NoModel", "InvalidGraph"})

ORT_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,  # an INT8 KV cache (build --kv-cache int8)
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
    ort = import_onnxruntime()

    return _OrtInfo(ort.__version__, tuple(ort.get_available_providers()))


class OrtBackend(VisionBackend):
    """ONNX Runtime session over an ONNX file (external data next to it is found by ORT)."""

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        providers: Sequence[str | tuple[str, dict[str, str]]] | None = None,
        intra_op_threads: int = 0,
        custom_op_libraries: Sequence[str | Path] = (),
        extra_outputs: Sequence[str] = (),
    ) -> None:
        ort = import_onnxruntime()

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3  # errors only: ORT's warnings are about its own optimizers
        try:
            model, config, libraries = session_model(onnx_path, extra_outputs)  # fused graphs need the CPU kernel
        except Exception as exc:  # protobuf DecodeError, a truncated file, bad external data
            raise BundleError(unloadable(onnx_path, exc)) from None
        chosen = list(providers) if providers else default_ort_providers()
        if libraries and TENSORRT_PROVIDER in provider_names(chosen):  # libraries: the graph is fused
            raise fused_graph_on_tensorrt_provider(onnx_path)
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        for library in [*custom_op_libraries, *libraries]:
            options.register_custom_ops_library(str(library))
        self.session = create_session(model, options, chosen, path=onnx_path)
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


def unloadable(path: str | Path, exc: BaseException) -> str:
    """One line for a bundle file a library could not load, with what to run next."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"{path}: cannot be loaded ({detail[:300]}); the file may be truncated or changed: verifying the "
        "bundle re-hashes every file (check, or run with verify)"
    )


def provider_names(providers: Sequence[object]) -> list[str]:
    """The names in an ``InferenceSession`` providers list (names, or (name, options) pairs)."""
    return [entry[0] if isinstance(entry, tuple) else str(entry) for entry in providers]


def fused_graph_on_tensorrt_provider(where: str | Path) -> BackendUnavailableError:
    """ONNX Runtime's TensorRT provider cannot run the fused ``ccra::LPWCA`` node: it hands TensorRT
    plugin nodes only from its ``trt.plugins`` domain, which it fills from TensorRT's IPluginV2
    creator list after a plain dlopen of ``trt_extra_plugin_lib_paths`` (engine/ort_trt.py)."""
    return BackendUnavailableError(
        f"{where}: the graph has the fused ccra::LPWCA node, which ONNX Runtime's TensorRT provider cannot run "
        "(it maps only trt.plugins nodes to IPluginV2 creators; this plugin is IPluginV3): run it with {backend} "
        "trt and the plugin library, or give this provider a portable graph",
        mentions=("backend",),
        remedy=Remedy("build", (("lpwca", "portable"), ("backend", "ort-trt")), complete=False),
    )


def session_failure(path: str | Path, providers: Sequence[object], exc: BaseException) -> str:
    """One line for a session ONNX Runtime could not create: an unreadable model (truncated, not
    ONNX) says so and how to verify the bundle; anything else (a provider that could not build or
    start, a missing kernel) is what the library itself said, with the providers asked for."""
    if type(exc).__name__ in _UNREADABLE_MODEL:
        return unloadable(path, exc)
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    detail = lines[0] if lines else type(exc).__name__
    detail = detail.split(" : ", 2)[-1] if detail.startswith("[ONNXRuntimeError]") else detail  # "... : 1 : FAIL : x"
    return (
        f"{path}: ONNX Runtime could not create a session on {', '.join(provider_names(providers))} "
        f"({type(exc).__name__}: {detail[:400]})"
    )


def create_session(
    model: str | bytes | Path, options: object, providers: Sequence[object], *, path: str | Path
) -> object:
    """``ort.InferenceSession`` whose failure is one line: an unreadable model as such, a failing
    provider or session with the library's own message (``session_failure``)."""
    ort = import_onnxruntime()

    try:
        return ort.InferenceSession(str(model) if isinstance(model, Path) else model, options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types, not one base class
        raise BundleError(session_failure(path, providers, exc)) from None


def available_providers() -> tuple[str, ...]:
    """The execution providers this ONNX Runtime build offers."""
    return _ort_info().providers


def cuda_provider_options(precision: str | None) -> dict[str, str]:
    """ONNX Runtime CUDA provider options for a graph of ``precision``. FP32 graphs turn TF32 off
    (``use_tf32``, on by default): it rounds matmul inputs to 10 mantissa bits, far outside the FP32
    parity bound of 1e-4 relative."""
    return {"use_tf32": "0"} if precision == "fp32" else {}


def default_ort_providers(precision: str | None = None) -> list[str | tuple[str, dict[str, str]]]:
    """CUDA first when this ONNX Runtime build has it (TF32 off for FP32 graphs), CPU always last."""
    available = _ort_info().providers
    chosen: list[str | tuple[str, dict[str, str]]] = []
    if "CUDAExecutionProvider" in available:
        options = cuda_provider_options(precision)
        chosen.append(("CUDAExecutionProvider", options) if options else "CUDAExecutionProvider")
    return [*chosen, "CPUExecutionProvider"]
