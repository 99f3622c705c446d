"""Importing ONNX Runtime, and what to hand ``onnxruntime.InferenceSession`` for a bundle graph.

ONNX Runtime is not a dependency of the base install: its distribution is the user's choice
(``[cpu]``: PyPI's onnxruntime; ``[gpu]``: onnxruntime-gpu; on a Jetson, JetPack's or Jetson AI
Lab's onnxruntime-gpu), because two distributions in one environment overwrite each other's
files. ``import_onnxruntime`` is where the package first needs it: without one, one line says
which to install.

Most graphs load from their path unchanged. Two cases need an in-memory copy of the graph:
fused graphs (``ccra::LPWCA`` nodes are moved to onnxruntime-extensions' domain, lpwca_ort.py)
and debugging runs that read intermediate tensors (``extra_outputs``, e.g. the INT8 per-layer
report). The bundle file on disk is never modified; external weights stay where they are.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import onnx

from ccra_export.core.errors import MissingDependencyError
from ccra_export.core.extras import install_command
from ccra_export.runtime.lpwca_ort import NO_SPINNING, custom_ops_library, has_lpwca, rewrite_for_ort

EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"

INSTALL_ORT = (
    f"{install_command('cpu')} in the ccra-export checkout (PyPI's onnxruntime), or {install_command('gpu')} "
    "(onnxruntime-gpu, CUDA and TensorRT providers, x86_64); on a Jetson, JetPack's or Jetson AI Lab's "
    "onnxruntime-gpu (docs/install.md: Installing on a Jetson). Install one ONNX Runtime distribution, never two"
)


def ort_distributions() -> dict[str, str]:
    """Every installed distribution that provides the ``onnxruntime`` module, with its version
    (onnxruntime, onnxruntime-gpu, a Jetson build, ...): more than one overwrite each other's files."""
    found = {}
    for name in importlib.metadata.packages_distributions().get("onnxruntime", []):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # a stale RECORD of an uninstalled one
            continue
    return dict(sorted(found.items()))


def import_onnxruntime(module: str = "onnxruntime") -> ModuleType:
    """``onnxruntime`` (or one of its modules, e.g. ``onnxruntime.quantization``), or one line naming
    the distribution to install (or the clash that broke it). Every import of ONNX Runtime goes
    through here, lazily: importing ccra-export never needs it."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as exc:  # OSError: a shared library of a broken or half-overwritten install
        installed = ort_distributions()
        if not installed:
            raise MissingDependencyError(f"ONNX Runtime is not installed: {INSTALL_ORT}") from None
        names = ", ".join(f"{name} {version}" for name, version in installed.items())
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "?"
        fix = (
            "two distributions overwrite each other's files: uninstall all of them, then install one"
            if len(installed) > 1
            else f"reinstall it, or {INSTALL_ORT}"
        )
        raise MissingDependencyError(
            f"ONNX Runtime ({names}) is installed but does not import ({type(exc).__name__}: {detail}): {fix}"
        ) from None


def session_model(
    onnx_path: str | Path, extra_outputs: Sequence[str] = ()
) -> tuple[str | bytes, dict[str, str], list[str]]:
    """(path or model bytes, session config entries, custom-op libraries to register)."""
    path = Path(onnx_path)
    proto = onnx.load(str(path), load_external_data=False)
    fused = has_lpwca(proto)
    if not fused and not extra_outputs:
        return str(path), {}, []
    if fused:
        rewrite_for_ort(proto)
    existing = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    config: dict[str, str] = {}
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        config[EXTERNAL_FOLDER_KEY] = str(path.parent.resolve())
    else:
        onnx.load_external_data_for_model(proto, str(path.parent))
    if fused:
        config.update(NO_SPINNING)
    return proto.SerializeToString(), config, [custom_ops_library()] if fused else []
