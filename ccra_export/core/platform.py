"""What hardware this is: the visible NVIDIA GPUs and, on a Jetson, its module, L4T and JetPack.

Detection reads files and runs ``nvidia-smi``, never imports a GPU library, so every layer can ask
(the runtime before loading an engine, ``doctor`` for its report). The parsers take text so the
tests can feed them what real Jetsons and GPUs print.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")

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


SMI_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,name,compute_cap", "--format=csv,noheader"]


def parse_nvidia_smi(text: str) -> list[tuple[str, str]]:
    """``nvidia-smi --query-gpu=[index,uuid,]name,compute_cap --format=csv,noheader`` -> [(name, '9.0'), ...]."""
    return [(name, cc) for _, _, name, cc in _smi_rows(text)]


def _smi_rows(text: str) -> list[tuple[int, str, str, str]]:
    rows = []
    for number, line in enumerate(text.strip().splitlines()):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 4 and fields[0].isdigit():  # index, uuid, name (may hold commas), compute_cap
            rows.append((int(fields[0]), fields[1], ", ".join(fields[2:-1]), fields[-1]))
        elif len(fields) >= 2:
            rows.append((number, "", ", ".join(fields[:-1]), fields[-1]))
    return rows


def visible_gpus(text: str, cuda_visible_devices: str | None) -> list[tuple[str, str]]:
    """The GPUs a CUDA process here sees, in its order: nvidia-smi lists every GPU of the machine,
    CUDA_VISIBLE_DEVICES (indices or UUIDs/UUID prefixes, comma-separated) selects and orders them;
    unset means all, and an invalid entry hides it and every one after it, as CUDA does."""
    rows = _smi_rows(text)
    if cuda_visible_devices is None:
        return [(name, cc) for _, _, name, cc in rows]
    chosen: list[tuple[str, str]] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        match = next(
            (r for r in rows if (entry.isdigit() and r[0] == int(entry)) or (entry and r[1].startswith(entry))),
            None,
        )
        if match is None or (match[2], match[3]) in chosen:
            break
        chosen.append((match[2], match[3]))
    return chosen


def run_quiet(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def gpus() -> list[tuple[str, str]]:
    """(name, compute capability) of each GPU this process may use: nvidia-smi filtered by
    CUDA_VISIBLE_DEVICES, else the Jetson module."""
    smi = run_quiet(SMI_QUERY)
    if smi:
        return visible_gpus(smi, os.environ.get("CUDA_VISIBLE_DEVICES"))
    jetson = detect_jetson()
    if jetson and jetson.compute_capability:
        return [(jetson.model or "Jetson", jetson.compute_capability)]
    return []


def detect_jetson() -> JetsonInfo | None:
    if not TEGRA_RELEASE.is_file():
        return None
    model = DEVICE_TREE_MODEL.read_text(errors="replace") if DEVICE_TREE_MODEL.is_file() else None
    return jetson_info(TEGRA_RELEASE.read_text(errors="replace"), model)
