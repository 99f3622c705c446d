"""shared/DESIGN.md's import rules, enforced: a Jetson runtime must not need torch, layers only
point down, and no two modules import each other, lazily or not."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lint_imports", ROOT / ".ci" / "lint_imports.py")
lint_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lint_imports)

RUNTIME_MODULES = [
    "ccra_export.runtime.backends",
    "ccra_export.runtime.lpwca_cpu",
    "ccra_export.runtime.lpwca_ort",
    "ccra_export.runtime.ort_session",
    "ccra_export.engine.ort_trt",
    "ccra_export.engine.plan",
    "ccra_export.engine.build",
    "ccra_export.runtime.engine_compat",
    "ccra_export.runtime.vision_backend",
    "ccra_export.runtime.language_model",
    "ccra_export.runtime.vlm_pipeline",
    "ccra_export.runtime.conversation",
    "ccra_export.runtime.attention",
    "ccra_export.serve.openai.api_server",
    "ccra_export.calibration.images",
    "ccra_export.calibration.quantize",
    "ccra_export.calibration.reader",
    "ccra_export.calibration.layer_report",
    "ccra_export.workflows.doctor",
    # what `ccra-export engine` and `check --reference recorded` need on a target without torch
    "ccra_export.workflows.engine",
    "ccra_export.workflows.check",
    "ccra_export.export.graph_checks",
    "ccra_export.core.reference_record",
    # the demo's task generator (calibration and eval use it on a target) and where its checkpoint is
    "ccra_export.core.shapes",
    "ccra_export.demo",
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


def test_import_contracts_are_kept():
    result = lint_imports.lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    # every module of every mapped folder was laid out and seen (lint() exits otherwise)
    expected = sum(len(list(folder.glob("*.py"))) for folder in lint_imports.package_dirs().values())
    assert f"{expected} modules checked" in result.stdout


def _copy_tree(dest: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    for folder in {p.relative_to(ROOT).parts[0] for p in lint_imports.package_dirs().values()}:
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return dest


# The cycles and reversed dependencies the layout issue found, each added back on purpose as a
# function-level import (what used to hide them); the contract named must then fail.
VIOLATIONS = {
    "workflows build <-> engine cycle": (
        [
            ("ccra_export/workflows/build.py", "from ccra_export.workflows import engine"),
            ("ccra_export/workflows/engine.py", "from ccra_export.workflows import build"),
        ],
        "No cycles anywhere",
    ),
    "runtime depends on a verb's module": (
        [("runtime/trt_engine.py", "from ccra_export.workflows.doctor import gpus")],
        "Layers",
    ),
    "runtime backends <-> trt_engine cycle": (
        [("runtime/trt_engine.py", "from ccra_export.runtime.backends import tensorrt_status")],
        "No cycles anywhere",
    ),
    "core depends on a stage": (
        [("ccra_export/core/manifest.py", "from ccra_export.runtime import backends")],
        "Layers",
    ),
    "runtime imports torch": (
        [("runtime/language_model.py", "import torch")],
        "What a Jetson runs never needs PyTorch",
    ),
    "model imports a stage": (
        [("ccra_export/model/vision_model.py", "from ccra_export.export import onnx_export")],
        "The PyTorch model stands on core alone",
    ),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_each_known_violation_breaks_a_contract(tmp_path, case):
    edits, contract = VIOLATIONS[case]
    root = _copy_tree(tmp_path)
    for relative, statement in edits:
        path = root / relative
        path.write_text(path.read_text() + f"\n\ndef _violation() -> None:\n    {statement}  # noqa\n")
    result = lint_imports.lint(root)
    assert result.returncode != 0, f"{case}: no contract broke\n{result.stdout}"
    broken = [line for line in result.stdout.splitlines() if line.rstrip().endswith("BROKEN")]
    assert any(contract in line for line in broken) or contract in result.stdout.split("Broken contracts")[-1], (
        f"{case}: expected {contract!r} to break\n{result.stdout}"
    )
