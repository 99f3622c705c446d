"""TensorRT's calibration cache (the implicit-INT8 format), from ONNX Runtime's calibrated ranges.

Format, as ``IInt8Calibrator::writeCalibrationCache`` produces it: a header line
``TRT-<version>-<algorithm>``, then one ``<tensor name>: <scale>`` line per tensor, the scale
being amax / 127 as the big-endian hex of an IEEE float32. Implicit INT8 (a calibrator and
``BuilderFlag.INT8``) is deprecated in TensorRT 10 and removed in 11; there only the Q/DQ graph
applies. The header's version must match the TensorRT that reads the cache.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

#: calibration method -> the TensorRT calibrator class whose cache format the header names
ALGORITHMS = {"entropy": "EntropyCalibration2", "percentile": "EntropyCalibration2", "minmax": "MinMaxCalibration"}
DEFAULT_TRT_VERSION = "10.3.0"  # JetPack 6


def version_tag(version: str) -> str:
    """'10.3.0' -> '100300' (TensorRT >= 10); '8.6.1' -> '8601' (TensorRT 8/9): NV_TENSORRT_VERSION."""
    parts = [int(p) for p in version.split(".")[:3]] + [0, 0]
    major, minor, patch = parts[:3]
    return str(major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch)


def amax_ranges(ort_cache_json: Path) -> dict[str, float]:
    """tensor name -> max |range| from ONNX Runtime's JSON calibration cache."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(ort_cache_json)
    ranges = {}
    for name, tensor in data.items():
        low, high = tensor.range_value
        ranges[name] = float(max(abs(float(np.max(low))), abs(float(np.max(high)))))
    return ranges


def write_cache(ranges: dict[str, float], path: Path, *, method: str, trt_version: str = DEFAULT_TRT_VERSION) -> None:
    lines = [f"TRT-{version_tag(trt_version)}-{ALGORITHMS[method]}"]
    for name in sorted(ranges):
        scale = max(ranges[name], 1e-12) / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    Path(path).write_text("\n".join(lines) + "\n")


def read_cache(path: Path) -> tuple[str, dict[str, float]]:
    """(header, tensor name -> scale): the inverse of ``write_cache``."""
    header, *rows = Path(path).read_text().splitlines()
    scales = {}
    for row in rows:
        name, _, value = row.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
    return header, scales
