"""`ccra-export doctor`: what is installed and usable here, and the fix for what is not.

Detection reads files and runs commands, never imports torch. The parsers take text so the
tests can feed them the strings real Jetsons and GPUs print.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
PLUGIN_ENV = "CCRA_LPWCA_PLUGIN"
DEFAULT_PLUGIN = Path("build/plugins/trt_plugins/libccra_lpwca_plugin.so")

# L4T (R<major>.<minor>) -> JetPack, for the releases that carry TensorRT >= 8.5.
_JETPACK = {
    (35, 1): "5.0.2",
    (35, 2): "5.1",
    (35, 3): "5.1.1",
    (35, 4): "5.1.2",
    (35, 5): "5.1.3",
    (35, 6): "5.1.4",
    (36, 2): "6.0 DP",
    (36, 3): "6.0",
    (36, 4): "6.1 / 6.2",
    (38, 2): "7.0",
}
# Jetson module family -> CUDA compute capability.
_JETSON_SM = (("Thor", "11.0"), ("Orin", "8.7"), ("Xavier", "7.2"), ("TX2", "6.2"), ("Nano", "5.3"))


@dataclass
class Check:
    component: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class JetsonInfo:
    l4t: str
    jetpack: str | None
    model: str | None
    compute_capability: str | None


def parse_tegra_release(text: str) -> tuple[int, int, int] | None:
    """'# R36 (release), REVISION: 3.0, GCID: ...' -> (36, 3, 0)."""
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def jetson_info(release_text: str, model_text: str | None) -> JetsonInfo | None:
    version = parse_tegra_release(release_text)
    if version is None:
        return None
    model = model_text.strip("\x00 \n") if model_text else None
    sm = next((cc for family, cc in _JETSON_SM if model and family in model), None)
    return JetsonInfo(f"R{version[0]}.{version[1]}.{version[2]}", _JETPACK.get(version[:2]), model, sm)


def parse_nvidia_smi(text: str) -> list[tuple[str, str]]:
    """``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`` -> [(name, '9.0'), ...]."""
    rows = []
    for line in text.strip().splitlines():
        name, _, cc = line.rpartition(",")
        if name:
            rows.append((name.strip(), cc.strip()))
    return rows


def _run(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def gpus() -> list[tuple[str, str]]:
    """(name, compute capability) of each visible GPU: nvidia-smi, else the Jetson module."""
    smi = _run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"])
    if smi:
        return parse_nvidia_smi(smi)
    jetson = detect_jetson()
    if jetson and jetson.compute_capability:
        return [(jetson.model or "Jetson", jetson.compute_capability)]
    return []


def detect_jetson() -> JetsonInfo | None:
    if not TEGRA_RELEASE.is_file():
        return None
    model = DEVICE_TREE_MODEL.read_text(errors="replace") if DEVICE_TREE_MODEL.is_file() else None
    return jetson_info(TEGRA_RELEASE.read_text(errors="replace"), model)


def _ort_checks() -> list[Check]:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    dists = sorted(d for d in ("onnxruntime", "onnxruntime-gpu") if _installed(d))
    checks = [Check("ONNX Runtime", True, f"{ort.__version__}, providers: {', '.join(providers)}")]
    if len(dists) > 1:
        checks.append(
            Check(
                "ONNX Runtime distributions",
                False,
                f"both {' and '.join(dists)} are installed",
                "keep one: pip uninstall -y onnxruntime onnxruntime-gpu, then install the one you need",
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


def _export_stack_check() -> Check:
    from ccra_export.extras import EXPORT_MODULES, missing_modules

    missing = missing_modules(EXPORT_MODULES)
    if missing:
        return Check(
            "PyTorch export stack",
            False,
            f"{', '.join(missing)} not installed: this machine can run, check (recorded reference) and build engines",
            "only `build` needs it: pip install 'ccra-export[export]' (Jetson: JetPack's PyTorch first)",
        )
    return Check("PyTorch export stack", True, f"torch {importlib.metadata.version('torch')}: `build` works here")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def run_checks() -> list[Check]:
    from ccra_export.runtime.backends import tensorrt_status

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
    checks.append(_export_stack_check())
    cudart = _run(["nvcc", "--version"])
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
        from ccra_export.runtime.lpwca_cpu import library_path

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
