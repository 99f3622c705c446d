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


@pytest.mark.parametrize(
    ("nvcc", "jetson", "expected"),
    [
        ("Cuda compilation tools, release 12.6, V12.6.68", True, "87"),  # JetPack 6 on Orin: no sm_110 there
        ("Cuda compilation tools, release 13.0, V13.0.48", True, "110"),  # JetPack 7 on Thor
        ("Cuda compilation tools, release 12.6, V12.6.68", False, "80;86;87;89;90"),
        ("Cuda compilation tools, release 13.0, V13.0.48", False, "80;86;87;89;90;110"),
        (None, False, None),  # no nvcc: CMake builds the CPU kernel only
    ],
)
def test_default_cuda_architectures_follow_the_toolkit_found(nvcc, jetson, expected):
    from ccra_export.workflows.plugins import default_cuda_architectures, nvcc_version

    assert default_cuda_architectures(nvcc_version(nvcc), jetson) == expected


def test_the_installed_nvcc_accepts_every_default_architecture():
    """The rule's list for this toolkit is what nvcc accepts (a list naming sm_110 fails on CUDA 12)."""
    import shutil
    import subprocess

    from ccra_export.workflows.plugins import default_cuda_architectures, nvcc_version

    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on this machine")
    version = nvcc_version(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout)
    listed = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
    for arch in default_cuda_architectures(version, jetson=False).split(";"):
        assert f"compute_{arch}" in listed


@pytest.mark.parametrize(
    ("smi", "expected"),
    [("9.0\n", "90"), ("8.7\n", "87"), ("12.0\n9.0\n", "120"), ("", None), (None, None), ("N/A\n", None)],
)
def test_the_gpu_tests_build_for_the_devices_own_architecture(smi, expected):
    """nvidia-smi's compute_cap, not CMake's `native` (CMake >= 3.24; the project declares 3.18)."""
    from ccra_export.workflows.plugins import device_cuda_architecture

    assert device_cuda_architecture(smi) == expected


def test_a_failed_cuda_build_keeps_cmakes_output_for_the_reader(tmp_path):
    """What the GPU test shows with pytest.fail: the one line and the end of CMake's own output."""
    from ccra_export.workflows.plugins import NativeBuildError, build_cuda_kernel_library

    if shutil.which("cmake") is None or shutil.which("nvcc") is None:
        pytest.skip("cmake or nvcc not installed: CMake would not configure CUDA at all")
    with pytest.raises(NativeBuildError) as info:
        build_cuda_kernel_library(tmp_path / "b", "not-an-architecture")
    assert str(info.value).startswith("cmake configure failed:")
    assert "CMAKE_CUDA_ARCHITECTURES" in info.value.log_tail and len(info.value.log_tail.splitlines()) > 1
