"""The CUDA kernel of ccra::LPWCA against the plain PyTorch reference, on a GPU.

Runs the kernel through its C ABI (trt_plugins/lpwca/lpwca_cuda_capi.cpp) over torch CUDA tensors.
Needs a CUDA device and nvcc; builds the library with CMake for the local GPU unless
CCRA_LPWCA_CUDA_LIBRARY points at one.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ccra_export.core.config import preset
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.model.lpwca_fused import fold_query
from ccra_export.model.vision_model import build_model

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False): the CUDA kernel runs only on a GPU machine")
    path = os.environ.get("CCRA_LPWCA_CUDA_LIBRARY")
    if not path:
        if shutil.which("nvcc") is None or shutil.which("cmake") is None:
            pytest.skip("nvcc or cmake not found: cannot build the CUDA kernel library")
        build = tmp_path_factory.mktemp("cuda-build")
        subprocess.run(
            [
                "cmake",
                "-S",
                str(ROOT),
                "-B",
                str(build),
                "-DCMAKE_CUDA_ARCHITECTURES=native",
                "-DCCRA_BUILD_PLUGIN=OFF",
                "-DCCRA_BUILD_TESTS=OFF",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["cmake", "--build", str(build), "--target", "ccra_lpwca_cuda_capi", "-j"], check=True, capture_output=True
        )
        path = str(build / "trt_plugins" / "libccra_lpwca_cuda_capi.so")
    lib = ctypes.CDLL(path)
    lib.ccra_lpwca_cuda_forward.restype = ctypes.c_int
    return lib


def run_kernel(lib, features, weights, bias, attrs):
    batch, layers, patches, width = features.shape
    fused = torch.empty(batch, patches, width, device="cuda", dtype=features.dtype)
    attention = torch.empty(batch, layers, patches, device="cuda", dtype=features.dtype)
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
