"""TensorRT engines for a bundle: built by `build --backend trt`, or later on the target by
`ccra-export engine` from the bundle's portable ONNX graph.

Engines are not portable across TensorRT versions or GPUs, so the usual deployment is: build
and parity-check the bundle on a workstation, copy it to the Jetson, build the engine there.
That target needs neither PyTorch nor the checkpoint: the engine is checked against the PyTorch
outputs the build recorded (reference_record.py). Nothing here imports torch.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccra_export import atomic
from ccra_export.console import SILENT, Steps
from ccra_export.errors import BackendUnavailableError, BundleError, ConfigError
from ccra_export.hashing import sha256_file
from ccra_export.manifest import MANIFEST_NAME, read_manifest, verify_files

ENGINE_FILE = "vision.engine"
ENGINE_PARITY_FILE = "parity_engine.json"


@dataclass
class TrtOptions:
    """TensorRT engine build settings (``--backend trt`` / ``ort-trt``, ``ccra-export engine``)."""

    typing: str = "auto"
    workspace_mib: int = 2048
    optimization_level: int = 3
    timing_cache: Path | None = Path.home() / ".cache" / "ccra-export" / "timing.cache"

    def settings(self) -> Any:
        from ccra_export.runtime.trt_engine import EngineSettings

        return EngineSettings(self.workspace_mib, self.optimization_level, self.timing_cache)


def bundle_profile(manifest: dict[str, Any], overrides: dict[str, dict[str, int]] | None = None) -> Any:
    """The optimization profile of a bundle's graph: its manifest's symbolic axes, flags on top."""
    from ccra_export.runtime.trt_plan import optimization_profiles

    return optimization_profiles(manifest["graph"]["inputs"], manifest["dynamic_axes"], overrides)


def build_trt_engine(
    graph: Path,
    engine_path: Path,
    precision: str,
    profile: Any,
    plugin_library: Path | None,
    trt_options: TrtOptions,
    steps: Steps = SILENT,
) -> tuple[Any, dict[str, Any]]:
    """Build ``engine_path`` from the ONNX ``graph`` with TensorRT; the backend running it and its
    manifest record (TensorRT version, GPU, compute capability, plugin hash, typing, profile)."""
    import tensorrt as trt

    from ccra_export.doctor import gpus
    from ccra_export.runtime import trt_engine
    from ccra_export.runtime.trt_plan import TrtVersion, engine_record, precision_plan

    plan = precision_plan(TrtVersion.parse(trt.__version__), precision, trt_options.typing)
    steps.info(f"engine: {plan.why}")
    libraries = [plugin_library] if plugin_library else []
    with steps.step("Building the TensorRT engine (minutes on a Jetson)") as update:
        serialized = trt_engine.build_engine(graph, plan, profile, trt_options.settings(), libraries, report=update)
    engine_path.write_bytes(serialized)
    name, cc = (gpus() or [("unknown GPU", "unknown")])[0]
    record = engine_record(
        trt.__version__,
        name,
        cc,
        sha256_file(plugin_library) if plugin_library else None,
        plan,
        profile,
        {
            "file": ENGINE_FILE,
            "workspace_mib": trt_options.workspace_mib,
            "optimization_level": trt_options.optimization_level,
        },
    )
    return trt_engine.TensorRTBackend(engine_path), record


def add_engine(
    bundle: Path,
    *,
    trt_options: TrtOptions,
    plugin_library: Path | None = None,
    profile_overrides: dict[str, dict[str, int]] | None = None,
    reference: str = "auto",
    model_override: str | None = None,
    force: bool = False,
    steps: Steps = SILENT,
) -> Any:
    """`ccra-export engine`: build ``vision.engine`` into an existing bundle, check its parity
    against PyTorch, record it in the manifest. Returns the parity report.

    Every refusal that needs no TensorRT comes first, so it is one line on any machine. The
    engine is built in a scratch directory inside the bundle and moved in, then the manifest is
    replaced atomically: an interrupted build leaves the bundle as it was.
    """
    from ccra_export.pipeline import check_parity, resolve_reference
    from ccra_export.runtime.backends import tensorrt_status

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if manifest.get("engine") and not force:
        raise BundleError(f"--bundle {bundle}: already holds {ENGINE_FILE}; pass --force to rebuild it")
    if manifest.get("plugin") and plugin_library is None:
        raise ConfigError(
            "--plugin-library: this bundle's graph has the fused ccra::LPWCA node; pass the plugin library "
            "built for this machine (ccra-export plugins build)"
        )
    if plugin_library is not None and not Path(plugin_library).is_file():
        raise ConfigError(f"--plugin-library {plugin_library}: no such file")
    profile = bundle_profile(manifest, profile_overrides)
    reference_kind, reference_line = resolve_reference(reference, manifest, model_override)
    with steps.step("Verifying bundle file hashes"):
        verify_files(bundle, manifest)
    usable, reason = tensorrt_status()
    if not usable:
        raise BackendUnavailableError(
            f"ccra-export engine: {reason}; run it where TensorRT 10+ and a GPU are (`ccra-export doctor`)"
        )
    steps.info(reference_line)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".engine-", dir=bundle))
    except OSError as exc:
        raise BundleError(f"--bundle {bundle}: not writable ({exc.strerror or exc})") from None
    try:
        runner, record = build_trt_engine(
            bundle / manifest["graph"]["file"],
            scratch / ENGINE_FILE,
            manifest["precision"],
            profile,
            plugin_library,
            trt_options,
            steps,
        )
        report = check_parity(bundle, manifest, runner, reference_kind, model_override=model_override, steps=steps)
        atomic.write_json(bundle / ENGINE_PARITY_FILE, report.to_dict())
        record["parity"] = {"file": ENGINE_PARITY_FILE, "passed": report.passed, "reference": report.reference}
        (scratch / ENGINE_FILE).replace(bundle / ENGINE_FILE)
        manifest["engine"] = record
        manifest["files"][ENGINE_FILE] = sha256_file(bundle / ENGINE_FILE)
        atomic.write_json(bundle / MANIFEST_NAME, manifest)
    except OSError as exc:
        raise BundleError(f"--bundle {bundle}: cannot write the engine ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report
