"""What a source distribution carries and what a wheel built from it can do.

The sdist must carry the native sources (MANIFEST.in): a wheel built from it compiles the LPWCA CPU
kernel with the root CMakeLists.txt (setup.py). A wheel carries no sources, so `plugins build`
from such an install refuses in one line instead of failing inside CMake. The sdist and the wheel
are built here with setuptools' own PEP 517 hooks (what `python -m build --no-isolation` calls),
from a copy of the checkout, so the checkout's own egg-info is never rewritten. About 10 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from ccra_export.workflows.plugins import SOURCES, missing_sources

ROOT = Path(__file__).resolve().parents[1]
#: not part of the source tree: environments, build products, caches
NOT_SOURCE = (".venv", ".git", "build", "dist", "out", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")
NATIVE_SUFFIXES = {".cpp", ".cu", ".h", ".md", ".txt"}


def _hook(name: str, tree: Path, out: Path) -> Path:
    """Run setuptools' PEP 517 hook ``name`` in ``tree``; the file it wrote into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta; print(build_meta.{name}({str(out)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("checkout") / "ccra-export"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*NOT_SOURCE, "*.so"))
    return _hook("build_sdist", tree, tmp_path_factory.mktemp("sdist"))


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> Path:
    """A wheel built from the unpacked sdist alone, as pip does with an sdist."""
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    (tree,) = unpacked.iterdir()
    return _hook("build_wheel", tree, tmp_path_factory.mktemp("wheel"))


def test_the_sdist_carries_every_native_source(sdist):
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    native = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "trt_plugins").rglob("*")
        if path.is_file() and path.suffix in NATIVE_SUFFIXES
    }
    assert "trt_plugins/lpwca/lpwca_cpu.cpp" in native and "trt_plugins/lpwca/lpwca_plugin.cpp" in native
    assert {"CMakeLists.txt", "setup.py", *SOURCES, *native} <= names, sorted(native - names)
    assert not [name for name in names if name.endswith((".so", ".o"))]


def test_a_wheel_built_from_the_sdist_compiles_the_cpu_kernel(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    kernels = [n for n in names if n.startswith("ccra_export/runtime/_ccra_lpwca_cpu") and n.endswith(".so")]
    assert len(kernels) == 1, names
    assert "ccra_export/demo/checkpoint/ccra.safetensors" in names  # the demo travels as package data
    assert not [n for n in names if n.startswith("trt_plugins/") or n == "CMakeLists.txt"]


def test_plugins_build_from_a_wheel_install_refuses_in_one_line(wheel, tmp_path):
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    code = (
        "import ccra_export, sys\n"
        f"assert ccra_export.__file__.startswith({str(site)!r}), ccra_export.__file__\n"
        "from ccra_export.cli import main\n"
        "main()\n"
    )
    build_dir = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(site)}
    command = [sys.executable, "-c", code, "plugins", "build", "--build-dir", str(build_dir)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the native sources are not beside"), result.stderr
    assert "CMakeLists.txt" in lines[0] and "checkout" in lines[0] and str(site) in lines[0]
    assert not build_dir.exists()


def test_a_checkout_has_every_source_plugins_build_needs(tmp_path):
    assert missing_sources() == [] and missing_sources(ROOT) == []
    assert missing_sources(tmp_path) == list(SOURCES)
