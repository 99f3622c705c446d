"""Which optional parts of ccra-export are installed, and the one-line fix when one is missing.

The base install is what a deployment target needs: ONNX Runtime, the runtime, `engine`,
`check` against the recorded reference, `run`, `doctor`. Exporting from PyTorch (`build`,
`check --reference pytorch`, `bench`'s Hugging Face side) is the ``[export]`` extra, so a Jetson
does not have to carry PyTorch and transformers.
"""

from __future__ import annotations

import importlib.util

from ccra_export.core.errors import MissingDependencyError

EXPORT_MODULES = ("torch", "transformers", "onnxscript", "safetensors")


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The top-level modules of ``names`` that cannot be imported here (found without importing them)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked entry in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def export_stack_available() -> bool:
    return not missing_modules(EXPORT_MODULES)


def require_export_stack(what: str) -> None:
    """Refuse ``what`` in one line when the PyTorch export stack is not installed."""
    missing = missing_modules(EXPORT_MODULES)
    if missing:
        raise MissingDependencyError(
            f"{what} needs PyTorch and the export stack ({', '.join(missing)} not installed): "
            "pip install 'ccra-export[export]' (on a Jetson, install JetPack's PyTorch first)"
        )
