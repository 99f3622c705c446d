"""`ccra-export doctor`: what is installed and usable here, and the fix for what is not.

Detection reads files and runs commands (``core.platform``), never imports torch.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ccra_export.core.errors import MissingDependencyError
from ccra_export.core.extras import install_command, install_hint, missing
from ccra_export.core.platform import TEGRA_RELEASE, detect_jetson, gpus, run_quiet
from ccra_export.runtime.backends import tensorrt_status
from ccra_export.runtime.lpwca_cpu import library_path
from ccra_export.runtime.ort_session import INSTALL_ORT, import_onnxruntime, ort_distributions

PLUGIN_ENV = "CCRA_LPWCA_PLUGIN"
DEFAULT_PLUGIN = Path("build/plugins/trt_plugins/libccra_lpwca_plugin.so")


@dataclass
class Check:
    component: str
    ok: bool
    detail: str
    fix: str = ""


def _ort_checks() -> list[Check]:
    """ONNX Runtime: which distribution(s) are installed (two break each other), its providers."""
    dists = ort_distributions()
    names = ", ".join(f"{name} {version}" for name, version in dists.items())
    try:
        ort = import_onnxruntime()
    except MissingDependencyError as exc:
        return [Check("ONNX Runtime", False, names or "not installed", str(exc))]
    providers = ort.get_available_providers()
    checks = [Check("ONNX Runtime", True, f"{ort.__version__}, providers: {', '.join(providers)}")]
    checks.append(
        Check(
            "ONNX Runtime distributions",
            len(dists) <= 1,
            names if len(dists) <= 1 else f"{len(dists)} installed: {names}; they overwrite each other's files",
            ""
            if len(dists) <= 1
            else f"keep one: pip uninstall -y {' '.join(dists)}, then install the one you need "
            f"({install_command('cpu')} or {install_command('gpu')} in the ccra-export checkout; on a Jetson, "
            "Jetson AI Lab's onnxruntime-gpu)",
        )
    )
    for provider, use in (("CUDAExecutionProvider", "CUDA"), ("TensorrtExecutionProvider", "--backend ort-trt")):
        checks.append(
            Check(
                f"ORT {provider}",
                provider in providers,
                "available" if provider in providers else "absent",
                ""
                if provider in providers
                else f"for {use}: install onnxruntime-gpu (and only it) "
                "built for your CUDA; on Jetson, the Jetson AI Lab onnxruntime-gpu wheel",
            )
        )
    return checks


def _lm_device_check() -> Check:
    """Which language-model builds (--lm-device) this machine can run."""
    try:
        providers = import_onnxruntime().get_available_providers()
    except MissingDependencyError:
        return Check("Language model devices", False, "none: ONNX Runtime is not installed", INSTALL_ORT)
    devices = ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in providers else [])
    return Check(
        "Language model devices",
        True,
        ", ".join(devices),
        ""
        if "cuda" in devices
        else "a bundle built with --lm-device cuda needs ONNX Runtime's CUDA provider: the onnxruntime-gpu build "
        "for your CUDA (Jetson: JetPack's or Jetson AI Lab's wheel, see docs/install.md)",
    )


def _export_stack_check() -> Check:
    absent = missing("export")
    if absent:
        return Check(
            "PyTorch export stack",
            False,
            f"{', '.join(absent)} not installed: this machine can run, check (recorded reference) and build engines",
            f"only `build` needs it: {install_hint('export')}",
        )
    return Check("PyTorch export stack", True, f"torch {importlib.metadata.version('torch')}: `build` works here")


def run_checks() -> list[Check]:
    checks = _ort_checks()
    usable, reason = tensorrt_status()
    checks.append(
        Check(
            "TensorRT",
            usable,
            reason,
            ""
            if usable
            else (
                "Jetson: TensorRT comes with JetPack (sudo apt install nvidia-jetpack; python3-libnvinfer for Python). "
                "x86: NVIDIA's tensorrt wheel or tarball (TensorRT >= 10)"
            ),
        )
    )
    found = gpus()
    checks.append(
        Check(
            "GPU",
            bool(found),
            ", ".join(f"{n} (sm {cc})" for n, cc in found) or "none visible",
            "" if found else "needs an NVIDIA GPU and driver (nvidia-smi should list it)",
        )
    )
    jetson = detect_jetson()
    if jetson is not None:
        jetpack = f"JetPack {jetson.jetpack}" if jetson.jetpack else "JetPack unknown"
        checks.append(
            Check(
                "Jetson",
                True,
                f"{jetson.model or 'unknown module'}, L4T {jetson.l4t} ({jetpack})",
                ""
                if (jetson.jetpack or "").startswith(("6", "7"))
                else "the TensorRT plugin needs TensorRT >= 10: JetPack 6 or newer",
            )
        )
    else:
        checks.append(Check("Jetson", True, f"not a Jetson ({TEGRA_RELEASE} absent)"))
    checks.append(_lm_device_check())
    checks.append(_export_stack_check())
    cudart = run_quiet(["nvcc", "--version"])
    version = re.search(r"release ([\d.]+)", cudart or "")
    checks.append(
        Check(
            "CUDA toolkit (nvcc)",
            bool(version),
            f"nvcc {version[1]}" if version else "nvcc not found",
            "" if version else "only needed to build the plugin: install the CUDA toolkit (JetPack has it)",
        )
    )
    plugin = Path(os.environ.get(PLUGIN_ENV, DEFAULT_PLUGIN))
    checks.append(
        Check(
            "LPWCA TensorRT plugin",
            plugin.is_file(),
            str(plugin) if plugin.is_file() else f"{plugin} not built",
            "" if plugin.is_file() else f"ccra-export plugins build (or set {PLUGIN_ENV})",
        )
    )
    try:
        checks.append(Check("LPWCA CPU kernel", True, str(library_path())))
    except Exception as exc:  # BackendUnavailableError with its own fix
        checks.append(Check("LPWCA CPU kernel", False, str(exc), "pip install -e . (builds it with CMake)"))
    checks.append(
        Check(
            "CMake",
            shutil.which("cmake") is not None,
            shutil.which("cmake") or "not found",
            "" if shutil.which("cmake") else "apt install cmake (needed for the native libraries)",
        )
    )
    return checks
