"""The CUDA kernel of ccra::LPWCA against the plain PyTorch reference, on a GPU.

Runs the kernel through its C ABI (trt_plugins/lpwca/lpwca_cuda_capi.cpp) over torch CUDA tensors.
Needs a CUDA device and nvcc; builds the library with CMake for the local GPU's architecture (from
torch, which sees the device here; not CMake's `native`, which needs CMake >= 3.24) unless
CCRA_LPWCA_CUDA_LIBRARY points at one. A failed build fails the test with CMake's output tail.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import pytest
import torch

from ccra_export.core.config import preset
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.core.platform import run_quiet
from ccra_export.model.lpwca_fused import fold_query
from ccra_export.model.vision_model import build_model
from ccra_export.workflows.plugins import (
    COMPUTE_CAP_QUERY,
    NativeBuildError,
    build_cuda_kernel_library,
    device_cuda_architecture,
)

pytestmark = pytest.mark.gpu


def load_cuda_library(build_dir: Path) -> ctypes.CDLL:
    """The C ABI library: CCRA_LPWCA_CUDA_LIBRARY, else built here for this GPU (skipped with the
    reason where a prerequisite is missing, failed with CMake's output where the build fails)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False): the CUDA kernel runs only on a GPU machine")
    path = os.environ.get("CCRA_LPWCA_CUDA_LIBRARY")
    if not path:
        missing = [tool for tool in ("nvcc", "cmake") if shutil.which(tool) is None]
        if missing:
            pytest.skip(f"{' and '.join(missing)} not found: cannot build the CUDA kernel library")
        major, minor = torch.cuda.get_device_capability()
        try:
            path = str(build_cuda_kernel_library(build_dir, f"{major}{minor}"))
        except NativeBuildError as exc:
            pytest.fail(f"{exc}\n{exc.log_tail}", pytrace=False)
    lib = ctypes.CDLL(path)
    lib.ccra_lpwca_cuda_forward.restype = ctypes.c_int
    return lib


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory):
    return load_cuda_library(tmp_path_factory.mktemp("cuda-build"))


def run_kernel(lib, features, weights, bias, attrs):
    batch, layers, patches, width = features.shape
    fused = torch.empty(batch, patches, width, device="cuda", dtype=features.dtype)
    attention = torch.empty(batch, layers, patches, device="cuda", dtype=torch.float32)  # FP32 for any features
    error = ctypes.create_string_buffer(512)

    def dims(t):
        return (ctypes.c_longlong * t.dim())(*t.shape)

    status = lib.ccra_lpwca_cuda_forward(
        ctypes.c_int(1 if features.dtype == torch.float16 else 0),
        ctypes.c_void_p(features.data_ptr()),
        ctypes.c_void_p(weights.data_ptr()),
        ctypes.c_void_p(bias.data_ptr()),
        dims(features),
        dims(weights),
        dims(bias),
        ctypes.c_int(attrs["num_heads"]),
        ctypes.c_float(attrs["epsilon"]),
        ctypes.c_float(attrs["head_scale"]),
        ctypes.c_float(attrs["layer_scale"]),
        ctypes.c_void_p(fused.data_ptr()),
        ctypes.c_void_p(attention.data_ptr()),
        ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
        error,
        ctypes.c_size_t(len(error)),
    )
    return status, error.value.decode(), fused, attention


def _case(name: str, batch: int, seed: int):
    config = preset(name)
    model = build_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    c = config.ccra
    features = torch.randn(batch, c.num_layers, config.num_patches, config.vision.hidden_size, generator=gen) * 3 + 0.5
    text = torch.randn(batch, 9, c.text_hidden_size, generator=gen)
    with torch.no_grad():
        q = model.ccra.text_query(text, torch.ones(batch, 9, dtype=torch.int64))
        want = model.ccra.lpwca(features, q)
        weights, bias = fold_query(model.ccra, q)
    attrs = dict(
        num_heads=c.num_heads, epsilon=c.layer_norm_eps, head_scale=c.head_dim**-0.5, layer_scale=c.attn_dim**-0.5
    )
    return features, weights, bias, attrs, want


@pytest.mark.parametrize("name", ["tiny", "llava-1.5-7b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_kernel_matches_pytorch_reference(cuda_library, name, dtype):
    features, weights, bias, attrs, (want_f, want_a) = _case(name, batch=2, seed=1)
    status, error, fused, attention = run_kernel(
        cuda_library, features.to("cuda", dtype), weights.cuda(), bias.cuda(), attrs
    )
    assert status == 0, error
    assert fused.dtype == dtype and attention.dtype == torch.float32
    precision = "fp32" if dtype == torch.float32 else "fp16"
    for label, got, want in (("fused", fused, want_f), ("attention", attention, want_a)):
        result = compare_output(label, got.float().cpu().numpy(), want.numpy(), thresholds_for(precision))
        assert result.passed, (label, result.failures, result.max_abs_err)


def test_cuda_kernel_refuses_inconsistent_shapes(cuda_library):
    features, weights, bias, attrs, _ = _case("tiny", batch=2, seed=2)
    status, error, _, _ = run_kernel(
        cuda_library, features.cuda(), weights[:, :-1].contiguous().cuda(), bias.cuda(), attrs
    )
    assert status == 1 and "needs 5" in error


def test_the_device_architecture_is_what_torch_reports():
    """The architecture the build is configured for is the device's own ("9.0" -> 90)."""
    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        pytest.skip("no CUDA device or nvidia-smi here")
    major, minor = torch.cuda.get_device_capability()
    assert device_cuda_architecture(run_quiet(COMPUTE_CAP_QUERY)) == f"{major}{minor}"


def test_the_plugin_registers_its_creator_in_tensorrt(tmp_path):
    """The getCreators library, hash-checked and loaded as a fused engine's is, makes TensorRT's
    registry find the creator the ONNX parser asks for (op type, plugin_version, plugin_namespace)."""
    from ccra_export.core.hashing import sha256_file
    from ccra_export.runtime.backends import tensorrt_status
    from ccra_export.workflows.plugins import build_native

    usable, reason = tensorrt_status()
    if not usable:
        pytest.skip(reason)
    root = os.environ.get("CCRA_TEST_TENSORRT_ROOT")
    if not root:
        pytest.skip("set CCRA_TEST_TENSORRT_ROOT to a TensorRT tree (include/NvInferRuntime.h) to build the plugin")
    major, minor = torch.cuda.get_device_capability()
    try:
        built = build_native(tmp_path / "b", tensorrt_root=Path(root), cuda_architectures=f"{major}{minor}")
    except NativeBuildError as exc:
        pytest.fail(f"{exc}\n{exc.log_tail}", pytrace=False)
    library = next(b.path for b in built if b.path.name == "libccra_lpwca_plugin.so")
    import tensorrt as trt

    from ccra_export.runtime.trt_engine import load_plugin

    load_plugin((library, sha256_file(library)))
    assert trt.get_plugin_registry().get_creator("LPWCA", "1", "ccra") is not None
