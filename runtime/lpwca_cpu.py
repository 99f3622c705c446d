"""ctypes binding of the C++ CPU reference kernel of ``ccra::LPWCA`` (trt_plugins/lpwca/lpwca_cpu.cpp).

The library is built by the root CMakeLists.txt; ``pip install`` builds it into this package
(setup.py). ``CCRA_LPWCA_CPU_LIBRARY`` points elsewhere, e.g. at a CMake build tree.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from ccra_export.core.errors import BackendUnavailableError

LIBRARY_ENV = "CCRA_LPWCA_CPU_LIBRARY"
LIBRARY_STEM = "_ccra_lpwca_cpu"


def library_path() -> Path:
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    found = sorted(Path(__file__).resolve().parent.glob(f"{LIBRARY_STEM}*.so"))
    if not found:
        raise BackendUnavailableError(
            f"the LPWCA CPU kernel library ({LIBRARY_STEM}*.so) is not built: reinstall with `pip install -e .` "
            f"(needs cmake and a C++ compiler) or set {LIBRARY_ENV}"
        )
    return found[0]


@functools.cache
def _library() -> ctypes.CDLL:
    path = library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BackendUnavailableError(f"{path}: cannot load the LPWCA CPU kernel ({exc})") from None
    f32 = ctypes.POINTER(ctypes.c_float)
    i64 = ctypes.POINTER(ctypes.c_longlong)
    lib.ccra_lpwca_cpu_forward.restype = ctypes.c_int
    lib.ccra_lpwca_cpu_forward.argtypes = [
        f32,
        f32,
        f32,
        i64,
        i64,
        i64,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_float,
        ctypes.c_float,
        f32,
        f32,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.ccra_lpwca_max_heads.restype = ctypes.c_int
    lib.ccra_lpwca_max_layers.restype = ctypes.c_longlong
    return lib


def kernel_limits() -> tuple[int, int]:
    """(max heads, max layers) compiled into the kernel."""
    lib = _library()
    return lib.ccra_lpwca_max_heads(), lib.ccra_lpwca_max_layers()


class LpwcaKernelError(ValueError):
    """The kernel refused its inputs (shapes that disagree, limits); the message says which."""


def lpwca_cpu(
    features: np.ndarray,
    query_weights: np.ndarray,
    query_bias: np.ndarray,
    *,
    num_heads: int,
    epsilon: float,
    head_scale: float,
    layer_scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the C++ kernel. Float16 features are computed in float32; F is returned in the features'
    type, A in float32 always, as the CUDA kernel and the ONNX schema emit it (FP16 would hold most
    of the map as subnormals: its mean is 1/(L*N), below FP16's smallest normal at llava sizes)."""
    dtype = features.dtype
    v = np.ascontiguousarray(features, dtype=np.float32)
    w = np.ascontiguousarray(query_weights, dtype=np.float32)
    b = np.ascontiguousarray(query_bias, dtype=np.float32)
    if v.ndim != 4 or w.ndim != 3 or b.ndim != 3:
        raise LpwcaKernelError(
            f"ccra::LPWCA: expected ranks 4/3/3 for features/query_weights/query_bias, got {v.ndim}/{w.ndim}/{b.ndim}"
        )
    batch, layers, patches, width = v.shape
    fused = np.empty((batch, patches, width), np.float32)
    attention = np.empty((batch, layers, patches), np.float32)
    error = ctypes.create_string_buffer(512)

    def ptr(array: np.ndarray):
        return array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    def dims(array: np.ndarray):
        return (ctypes.c_longlong * array.ndim)(*array.shape)

    status = _library().ccra_lpwca_cpu_forward(
        ptr(v),
        ptr(w),
        ptr(b),
        dims(v),
        dims(w),
        dims(b),
        num_heads,
        epsilon,
        head_scale,
        layer_scale,
        ptr(fused),
        ptr(attention),
        error,
        len(error),
    )
    if status != 0:
        raise LpwcaKernelError(error.value.decode())
    return fused.astype(dtype, copy=False), attention
