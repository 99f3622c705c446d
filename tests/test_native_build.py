"""`ccra-export plugins build`: CMake, nvcc and (when headers are given) the TensorRT plugin."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.hashing import sha256_file

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: CUDA kernels cannot compile")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow  # 12 s; CI's own CMake step builds the same targets before pytest
@needs_nvcc
def test_without_tensorrt_headers_builds_kernels_and_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("TensorRT_ROOT", raising=False)
    if any(
        Path(p, "NvInferRuntime.h").is_file()
        for p in ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu")
    ):
        pytest.skip("TensorRT headers are installed system-wide here")
    result = run("plugins", "build", "--build-dir", tmp_path / "b", "--cuda-arch", "87")
    assert result.exit_code == 2
    assert "TensorRT headers not found (pass --tensorrt-root DIR" in result.stderr
    built = tmp_path / "b" / "trt_plugins"
    assert (built / "libccra_lpwca_cuda_capi.so").is_file() and (built / "libccra_lpwca_cpu.so").is_file()


def test_bad_tensorrt_root_is_refused_before_building(tmp_path):
    result = run("plugins", "build", "--build-dir", tmp_path / "b", "--tensorrt-root", tmp_path)
    assert result.exit_code == 2 and "no include/NvInferRuntime.h there" in result.stderr
    assert not (tmp_path / "b").exists()


@needs_nvcc
@pytest.mark.skipif(
    not os.environ.get("CCRA_TEST_TENSORRT_ROOT"),
    reason="set CCRA_TEST_TENSORRT_ROOT to a TensorRT tree (include/NvInferRuntime.h) to compile the plugin",
)
def test_plugin_builds_against_tensorrt_headers(tmp_path):
    result = run(
        "plugins",
        "build",
        "--build-dir",
        tmp_path / "b",
        "--cuda-arch",
        "87",
        "--tensorrt-root",
        os.environ["CCRA_TEST_TENSORRT_ROOT"],
    )
    assert result.exit_code == 0, result.output
    plugin = tmp_path / "b" / "trt_plugins" / "libccra_lpwca_plugin.so"
    assert sha256_file(plugin)[:16] in result.stdout
