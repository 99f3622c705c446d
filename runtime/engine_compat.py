"""Refusing an engine this machine cannot run, and choosing the plugin library it may load, before
TensorRT deserialises anything.

The engine stage records what an engine was built for (``ccra_export.engine.plan.engine_record``),
the plugin library's sha256 included; the runtime checks that record on load. Opening an engine
trusts native code twice: the engine (kernels TensorRT compiled for this GPU) and, for a fused
graph, the LPWCA plugin library. The library is never taken from the bundle: only the installed one
(given by the caller, or ``CCRA_LPWCA_PLUGIN_LIBRARY``) is loaded, after its hash matched the
record. TensorRT-free (the registry is duck-typed), so CI tests it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ccra_export.core.errors import BackendUnavailableError, BundleError, ConfigError, Remedy
from ccra_export.core.hashing import sha256_file
from ccra_export.core.manifest_schema import EngineBuild
from ccra_export.core.plugin_library import check_plugin_library

#: where the installed LPWCA plugin library (libccra_lpwca_plugin.so) is, when no caller names it
PLUGIN_LIBRARY_ENV = "CCRA_LPWCA_PLUGIN_LIBRARY"


def check_engine(
    record: EngineBuild,
    trt_version: str,
    compute_capability: str,
    plugin_sha256: str | None,
    bundle: str = "DIR",
) -> None:
    """Refuse, in one line, an engine this TensorRT / GPU / plugin library cannot run correctly.

    Engines are not portable: TensorRT refuses other versions (unless built version-compatible)
    and kernels are compiled for one compute capability.
    """
    built, here = record.get("tensorrt_version"), trt_version
    reasons = []
    if built != here:
        reasons.append(f"TensorRT {built} built it, this is TensorRT {here}")
    if record.get("compute_capability") != compute_capability:
        reasons.append(
            f"built for compute capability {record.get('compute_capability')} ({record.get('gpu')}), "
            f"this GPU is {compute_capability}"
        )
    if record.get("plugin_sha256") and plugin_sha256 and record["plugin_sha256"] != plugin_sha256:
        reasons.append("the LPWCA plugin library differs from the one it was built with")
    if reasons:
        raise BundleError(
            f"engine mismatch: {'; '.join(reasons)}: rebuild it here from the bundle's portable ONNX graph",
            remedy=Remedy("engine", (("bundle", bundle), ("force", True))),
        )


def installed_plugin_library(given: Path | None = None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The installed plugin library: the one the caller names, else ``CCRA_LPWCA_PLUGIN_LIBRARY``."""
    if given is not None:
        return Path(given)
    named = environ.get(PLUGIN_LIBRARY_ENV)
    return Path(named) if named else None


def engine_plugin(record: EngineBuild, library: Path | None, bundle: str = "DIR") -> tuple[Path, str] | None:
    """(library, sha256) an engine needs loaded before it is deserialised, None when it needs none.

    The record's ``plugin_sha256`` says whether the engine has the fused node and which library
    built it; ``library`` must be a plugin library (ELF, exports getCreators) with that very hash.
    Anything else is refused in one line, before any of its code could run.
    """
    recorded = record.get("plugin_sha256")
    if not recorded:
        return None
    if library is None:
        raise BundleError(
            f"its engine runs the fused ccra::LPWCA node through the plugin library it was built with (sha256 "
            f"{recorded[:16]}...); give that library with {{plugin_library}} or {PLUGIN_LIBRARY_ENV}",
            field="bundle",
            value=bundle,
            mentions=("plugin_library",),
            remedy=Remedy("plugins build"),
        )
    check_plugin_library(library)
    digest = sha256_file(library)
    if digest != recorded:
        raise ConfigError(
            f"sha256 {digest[:16]}... is not the library this engine was built with ({recorded[:16]}...); only "
            "that one is loaded: give it, or rebuild the engine with this library",
            field="plugin_library",
            value=library,
            remedy=Remedy("engine", (("bundle", bundle), ("force", True)), complete=False),
        )
    return Path(library), digest


class PluginLibraries:
    """The LPWCA plugin libraries loaded into TensorRT's plugin registry, once per process.

    ``IPluginRegistry::loadLibrary`` returns null when one of a library's creators is registered
    already (NvInferRuntimeCommon.h), so a library is loaded once and kept for the process (an engine
    built or deserialised here needs its creator as long as it lives); a second, different LPWCA
    library would collide with the first and is refused.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, tuple[Path, Any]] = {}  # sha256 -> (path, registry handle)
        self._lock = threading.Lock()

    def load(self, registry: Any, library: Path, digest: str) -> None:
        """Load ``library`` (sha256 ``digest``) through ``registry.load_library`` unless it is loaded."""
        with self._lock:
            if digest in self._loaded:
                return
            if self._loaded:
                (other, _), *_ = self._loaded.values()
                raise BackendUnavailableError(
                    f"{library}: another LPWCA plugin library ({other}) is loaded in this process already and its "
                    "creator would collide with this one's: run engines built with different libraries in "
                    "separate processes"
                )
            handle = registry.load_library(str(library))
            if handle is None:  # TensorRT says why in its log; this says what it means here
                raise BackendUnavailableError(
                    f"{library}: TensorRT's IPluginRegistry::loadLibrary refused it (no getCreators, or a "
                    "ccra::LPWCA creator registered already by another library in this process)"
                )
            self._loaded[digest] = (Path(library), handle)


#: this process's loaded plugin libraries (the builder and the engine runner share it)
PLUGINS = PluginLibraries()
