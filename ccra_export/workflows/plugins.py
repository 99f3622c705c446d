"""`ccra-export plugins build`: configure, build and test the native libraries with CMake.

The same commands work by hand (docs/tensorrt.md, "Building the TensorRT plugin"); this wraps them with
the flags a Jetson user needs, runs the C++ tests, and reports each library with its sha256
(the hash a bundle manifest records with --plugin-library).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import CCRAExportError
from ccra_export.core.hashing import sha256_file
from ccra_export.core.platform import detect_jetson, run_quiet

ROOT = Path(__file__).resolve().parents[2]  # the repository: ccra_export/workflows/plugins.py
LIBRARIES = {
    "TensorRT plugin (loadLibrary / getCreators)": "libccra_lpwca_plugin.so",
    "TensorRT plugin (static registration: a plain dlopen, Triton)": "libccra_lpwca_plugin_static.so",
    "CUDA kernels, C ABI": "libccra_lpwca_cuda_capi.so",
    "CPU kernel": "libccra_lpwca_cpu.so",
}


#: what CMake needs, relative to ROOT: a checkout and an sdist have them (MANIFEST.in), a wheel does not
SOURCES = ("CMakeLists.txt", "trt_plugins/lpwca/CMakeLists.txt", "trt_plugins/lpwca/lpwca_cpu.cpp")


def missing_sources(root: Path | None = None) -> list[str]:
    """The native sources absent under ``root`` (default: where this package stands): a package
    installed from a wheel has none, so ``plugins build`` refuses in one line instead of CMake's
    error."""
    base = ROOT if root is None else root
    return [name for name in SOURCES if not (base / name).is_file()]


class NativeBuildError(CCRAExportError):
    """CMake, the compiler or TensorRT's headers are missing or the build failed; ``log_tail`` holds
    the end of the tool's output for a reader who needs more than the one line."""

    def __init__(self, message: str, *, log_tail: str = "", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.log_tail = log_tail


@dataclass
class BuiltLibrary:
    label: str
    path: Path
    sha256: str


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = [line for line in f"{result.stdout}\n{result.stderr}".splitlines() if line.strip()]
        errors = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = next((line for line in errors if "error" in line.lower()), errors[-1] if errors else "no output")
        raise NativeBuildError(f"{what} failed: {reason.strip()}", log_tail="\n".join(lines[-40:]))
    return result.stdout


#: what nvcc can target by default: datacenter Ampere/Ada/Hopper and Jetson Orin (87); Thor (110)
#: exists from CUDA 13.0 only (JetPack 6 ships CUDA 12.6), and CUDA 13 dropped Xavier's 72
DEFAULT_CUDA_ARCHITECTURES = (80, 86, 87, 89, 90)
_NVCC_RELEASE = re.compile(r"release (\d+)\.(\d+)")


def nvcc_version(text: str | None) -> tuple[int, int] | None:
    """``nvcc --version``'s ``release X.Y``, or None."""
    match = _NVCC_RELEASE.search(text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def default_cuda_architectures(version: tuple[int, int] | None, jetson: bool) -> str | None:
    """The architectures `plugins build` compiles when none are given, from the CUDA toolkit found
    (None: no nvcc, CMake decides): on a Jetson the device's own (Orin 87 with CUDA 12, Thor 110
    with CUDA 13), elsewhere every datacenter and Jetson target that toolkit has."""
    if version is None:
        return None
    if jetson:
        return "110" if version >= (13, 0) else "87"
    return ";".join(map(str, (*DEFAULT_CUDA_ARCHITECTURES, *((110,) if version >= (13, 0) else ()))))


#: nvidia-smi's compute capability query (the driver's own number: no CUDA toolkit or torch needed)
COMPUTE_CAP_QUERY = ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]


def device_cuda_architecture(smi_output: str | None) -> str | None:
    """The first GPU's CUDA architecture from ``COMPUTE_CAP_QUERY``'s output ("9.0" -> "90"), or None.
    What ``-DCMAKE_CUDA_ARCHITECTURES=native`` would pick, without CMake >= 3.24 (the project needs 3.18)."""
    for line in (smi_output or "").splitlines():
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
        if match:
            return f"{match.group(1)}{match.group(2)}"
    return None


def build_cuda_kernel_library(build_dir: Path, architecture: str, jobs: int | None = None) -> Path:
    """Configure and build only the CUDA kernels' C ABI library (no TensorRT, no C++ tests) for one
    architecture, as the GPU test and benchmark need it; the library's path. A failure is a
    NativeBuildError whose ``log_tail`` is the end of CMake's output."""
    configure = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_CUDA_ARCHITECTURES={architecture}",
        "-DCCRA_BUILD_PLUGIN=OFF",
        "-DCCRA_BUILD_TESTS=OFF",
    ]
    _run(configure, "cmake configure")
    jobs_flag = ["-j", str(jobs or os.cpu_count() or 1)]
    _run(["cmake", "--build", str(build_dir), "--target", "ccra_lpwca_cuda_capi", *jobs_flag], "cmake build")
    return Path(build_dir) / "trt_plugins" / LIBRARIES["CUDA kernels, C ABI"]


def build_native(
    build_dir: Path,
    *,
    tensorrt_root: Path | None = None,
    cuda_architectures: str | None = None,
    jobs: int | None = None,
    require_plugin: bool = True,
    steps: Steps = SILENT,
) -> list[BuiltLibrary]:
    absent = missing_sources()
    if absent:
        raise NativeBuildError(
            f"the native sources are not beside this installed ccra-export ({', '.join(absent)} missing in "
            f"{ROOT}): build the plugin from a ccra-export checkout (installed with `pip install -e .`) or an "
            "unpacked sdist"
        )
    if shutil.which("cmake") is None:
        raise NativeBuildError("cmake not found: install CMake >= 3.18 (JetPack: apt install cmake)")
    if tensorrt_root is not None and not (Path(tensorrt_root) / "include" / "NvInferRuntime.h").is_file():
        raise NativeBuildError("no include/NvInferRuntime.h there", field="tensorrt_root", value=tensorrt_root)
    configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"]
    if tensorrt_root is not None:
        configure.append(f"-DTensorRT_ROOT={Path(tensorrt_root).resolve()}")
    if not cuda_architectures and shutil.which("nvcc") is not None:
        cuda_architectures = default_cuda_architectures(
            nvcc_version(run_quiet(["nvcc", "--version"])), detect_jetson() is not None
        )
    if cuda_architectures:
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures.replace(',', ';')}")
    with steps.step("Configuring (CMake)"):
        log = _run(configure, "cmake configure")
    for line in log.splitlines():
        if line.startswith("-- ccra:"):
            steps.info(line[3:])
    with steps.step("Compiling (C++, CUDA)"):
        _run(["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 1)], "cmake build")
    with steps.step("Running the C++ tests (ctest)"):
        _run(["ctest", "--test-dir", str(build_dir), "--output-on-failure"], "ctest")
    built = []
    for label, name in LIBRARIES.items():
        path = Path(build_dir) / "trt_plugins" / name
        if path.is_file():
            built.append(BuiltLibrary(label, path, sha256_file(path)))
    if require_plugin and not any(
        b.path.name == LIBRARIES["TensorRT plugin (loadLibrary / getCreators)"] for b in built
    ):
        if any(b.path.name == "libccra_lpwca_cuda_capi.so" for b in built):  # CUDA is there, TensorRT is not
            raise NativeBuildError(
                "the TensorRT plugin was not built: TensorRT headers not found (pass {tensorrt_root} DIR, the "
                "directory holding include/NvInferRuntime.h)",
                mentions=("tensorrt_root",),
            )
        raise NativeBuildError(
            "the TensorRT plugin was not built: no CUDA compiler found (install the CUDA toolkit; JetPack ships it "
            "in /usr/local/cuda)"
        )
    return built
