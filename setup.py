"""Builds the LPWCA CPU kernel library with the root CMakeLists.txt during `pip install`.

Everything else about the package is in pyproject.toml. Only the CPU target is built here (a few
seconds); the CUDA kernels and the TensorRT plugin are built with CMake directly (docs/tensorrt.md:
"Building the TensorRT plugin") because they need nvcc / TensorRT and take minutes.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeTarget(Extension):
    def __init__(self, name: str, target: str, library: str) -> None:
        super().__init__(name, sources=[])
        self.target = target
        self.library = library


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeTarget) -> None:
        destination = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DCCRA_BUILD_CUDA=OFF",
            "-DCCRA_BUILD_PLUGIN=OFF",
            "-DCCRA_BUILD_TESTS=OFF",
        ]
        jobs = str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", ext.target, "-j", jobs], check=True)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build_dir / "trt_plugins" / ext.library, destination)


setup(
    ext_modules=[CMakeTarget("ccra_export.runtime._ccra_lpwca_cpu", "ccra_lpwca_cpu", "libccra_lpwca_cpu.so")],
    cmdclass={"build_ext": CMakeBuild},
)
