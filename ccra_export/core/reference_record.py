"""PyTorch's outputs recorded in the bundle, so parity can be proven where PyTorch is not.

Engines are not portable: a Jetson builds its own, and it need not have PyTorch or the
checkpoint. The build therefore stores its parity inputs and the FP32 PyTorch outputs on them
(``reference.npz``, hashed in the manifest like every bundle file); ``check --reference
recorded`` and ``ccra-export engine`` compare a backend against those. numpy only.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ccra_export.core.errors import BundleError

REFERENCE_FILE = "reference.npz"
#: Samples (batch rows) kept: enough to cover full and padded instructions, small at 7B sizes
#: (8 x 576 x 4096 FP32 outputs are 75 MB).
MAX_RECORDED_SAMPLES = 8
_INPUT, _OUTPUT = "input/", "output/"


def record_reference(path: Path, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> int:
    """Write the first ``MAX_RECORDED_SAMPLES`` rows of ``feeds`` and PyTorch's ``outputs``; returns the rows kept.

    Rows are independent (every op is per-sample), so a prefix of the batch is a valid check.
    """
    rows = min(MAX_RECORDED_SAMPLES, *(len(v) for v in feeds.values()))
    arrays = {_INPUT + name: np.ascontiguousarray(v[:rows]) for name, v in feeds.items()}
    arrays |= {_OUTPUT + name: np.ascontiguousarray(v[:rows], dtype=np.float32) for name, v in outputs.items()}
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return rows


def load_reference(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, PyTorch outputs) of a bundle's recorded reference; one-line error when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; the manifest lists it: rebuild or re-copy the bundle") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: unreadable recorded reference ({exc})") from None
    inputs = {k.removeprefix(_INPUT): v for k, v in arrays.items() if k.startswith(_INPUT)}
    outputs = {k.removeprefix(_OUTPUT): v for k, v in arrays.items() if k.startswith(_OUTPUT)}
    if not inputs or not outputs:
        raise BundleError(f"{path}: expected {_INPUT}* and {_OUTPUT}* arrays, found {sorted(arrays)}")
    return inputs, outputs
