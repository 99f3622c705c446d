"""shared/DESIGN.md's dependency direction, enforced: a Jetson runtime must not need torch."""

from __future__ import annotations

import subprocess
import sys

RUNTIME_MODULES = [
    "ccra_export.runtime.backends",
    "ccra_export.runtime.lpwca_cpu",
    "ccra_export.runtime.lpwca_ort",
    "ccra_export.runtime.ort_session",
    "ccra_export.runtime.ort_trt",
    "ccra_export.runtime.trt_plan",
    "ccra_export.runtime.language_model",
    "ccra_export.runtime.vlm_pipeline",
    "ccra_export.calibration.images",
    "ccra_export.calibration.quantize",
    "ccra_export.calibration.reader",
    "ccra_export.calibration.trt_cache",
    "ccra_export.calibration.layer_report",
    "ccra_export.doctor",
    # what `ccra-export engine` and `check --reference recorded` need on a target without torch
    "ccra_export.pipeline_engine",
    "ccra_export.reference_record",
    "ccra_export.cli",
]


def test_runtime_and_calibration_never_import_torch():
    code = (
        "import importlib, sys\n"
        f"for name in {RUNTIME_MODULES!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers')))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"torch/transformers imported by: {result.stdout.strip()}"
