"""Which optional parts (extras) of ccra-export are installed, and the one-line fix when one is missing.

Every "is this extra installed" question goes through here, so each extra is described once: the
modules it brings, what it is called in a message, and how to install it. The base install is what a
deployment target needs (ONNX Runtime, the runtime, `engine`, `check` against the recorded
reference, `run`, `doctor`); exporting from PyTorch, serving, drawing and Triton are extras.

ccra-export is installed from its checkout: it is not published on a package index, and a hint
naming its distribution with an extra would have pip download whatever an index serves under that
name. So the fix is always the checkout's own command, ``pip install -e ".[extra]"``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ccra_export.core.errors import MissingDependencyError


@dataclass(frozen=True)
class Extra:
    """One extra of pyproject.toml as the code needs it: what to look for and what to say."""

    name: str  #: the extra's name in pyproject.toml
    modules: tuple[str, ...]  #: top-level modules it brings (found without importing them)
    what: str  #: how a message calls it: "<purpose> needs <what>"
    note: str = ""  #: said after the install command (e.g. the Jetson way)


EXTRAS: dict[str, Extra] = {
    extra.name: extra
    for extra in (
        Extra(
            "export",
            ("torch", "transformers", "onnxscript", "safetensors"),
            "PyTorch and the export stack",
            "on a Jetson, install JetPack's PyTorch first",
        ),
        Extra(
            "lm",
            ("onnxruntime_genai",),
            "onnxruntime-genai's model builder",
            'where the [gpu] extra is installed, ".[lm-gpu]" instead',
        ),
        Extra("serve", ("fastapi", "uvicorn", "prometheus_client"), "FastAPI, uvicorn and prometheus-client"),
        Extra("explain", ("matplotlib",), "matplotlib, which draws the maps"),
        Extra("triton", ("tritonclient", "grpc", "google.protobuf"), "tritonclient, for Triton's ModelConfig schema"),
        Extra("tensorrt", ("polygraphy",), "Polygraphy, which runs TensorRT engines"),
    )
}
EXPORT_MODULES = EXTRAS["export"].modules


def install_command(extra: str) -> str:
    """The command that installs ``extra`` from the ccra-export checkout (its working directory)."""
    return f'pip install -e ".[{extra}]"'


def install_hint(extra: str) -> str:
    """``install_command`` with where to run it and the extra's note: the fix a message ends with."""
    note = EXTRAS[extra].note if extra in EXTRAS else ""
    return f"{install_command(extra)} in the ccra-export checkout" + (f" ({note})" if note else "")


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that cannot be imported here (found without importing them)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent that does not import, or a blocked entry in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that are not installed here (empty: the extra is usable)."""
    return missing_modules(EXTRAS[extra].modules)


def available(extra: str) -> bool:
    return not missing(extra)


def missing_error(extra: str, purpose: str, detail: str, *, field: str | None = None) -> MissingDependencyError:
    """The one-line refusal of ``purpose`` for want of ``extra``; ``detail`` says what was found wanting
    ("fastapi not installed", or the import error of a broken install)."""
    return MissingDependencyError(
        f"{purpose} needs {EXTRAS[extra].what} ({detail}): {install_hint(extra)}", field=field
    )


def require(extra: str, purpose: str, *, field: str | None = None) -> None:
    """Refuse ``purpose`` in one line, before any work, when ``extra`` is not installed.

    ``field``: the domain input that asked for the extra (``lm_precision``), for front ends that
    name it."""
    absent = missing(extra)
    if absent:
        raise missing_error(extra, purpose, f"{', '.join(absent)} not installed", field=field)


def export_stack_available() -> bool:
    return available("export")


def require_export_stack(what: str) -> None:
    """Refuse ``what`` in one line when the PyTorch export stack is not installed."""
    require("export", what)
