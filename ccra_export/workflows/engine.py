"""TensorRT engines for a bundle: built by `build --backend trt`, or later on the target by
`ccra-export engine` from the bundle's portable ONNX graph.

Engines are not portable across TensorRT versions or GPUs, so the usual deployment is: build
and parity-check the bundle on a workstation, copy it to the Jetson, build the engine there.
That target needs neither PyTorch nor the checkpoint: the engine is checked against the PyTorch
outputs the build recorded (core/reference_record.py). Nothing here imports torch.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ccra_export.core import atomic
from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import BackendUnavailableError, BundleError, ConfigError, Remedy
from ccra_export.core.manifest import ENGINE_PARITY_FILE, file_entry, read_manifest, verify_files, write_manifest
from ccra_export.core.manifest_schema import EngineBuild, EngineParity
from ccra_export.core.parity import ParityReport
from ccra_export.core.plugin_library import check_plugin_library
from ccra_export.core.vision_graphs import PARTS, TOWER, part_records
from ccra_export.engine.build import build_trt_engine, join_engine_records
from ccra_export.engine.plan import bundle_profile
from ccra_export.engine.settings import TrtOptions
from ccra_export.runtime.backends import join_parts, tensorrt_status
from ccra_export.runtime.vision_backend import VisionBackend
from ccra_export.workflows.parity import check_parity, resolve_reference


def add_engine(
    bundle: Path,
    *,
    trt_options: TrtOptions,
    plugin_library: Path | None = None,
    profile_overrides: dict[str, dict[str, int]] | None = None,
    reference: str = "auto",
    model_override: str | None = None,
    ccra_module: str | None = None,
    force: bool = False,
    steps: Steps = SILENT,
) -> ParityReport:
    """`ccra-export engine`: build ``vision.engine`` into an existing bundle, check its parity
    against PyTorch, record it in the manifest. Returns the parity report.

    Every refusal that needs no TensorRT comes first, so it is one line on any machine. The
    engine is built in a scratch directory inside the bundle and moved in, then the manifest is
    replaced atomically: an interrupted build leaves the bundle as it was.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    parts = part_records(manifest)
    names = [PARTS[part["name"]].engine_file for part in parts]  # vision.engine, or the tower's and the head's
    if manifest.get("engine") and not force:
        raise BundleError(
            f"already holds {' and '.join(names)}; pass {{force}} to rebuild",
            field="bundle",
            value=bundle,
            mentions=("force",),
        )
    if manifest.get("plugin") and plugin_library is None:
        raise ConfigError(
            "this bundle's graph has the fused ccra::LPWCA node; pass the plugin library built for this machine",
            field="plugin_library",
            remedy=Remedy("plugins build"),
        )
    if plugin_library is not None:
        check_plugin_library(plugin_library)
    profiles = [bundle_profile(manifest, profile_overrides, part) for part in parts]
    reference_kind, reference_line = resolve_reference(reference, manifest, model_override, ccra_module)
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
        raise BundleError(f"not writable ({exc.strerror or exc})", field="bundle", value=bundle) from None
    try:
        runners: list[VisionBackend] = []
        records: list[EngineBuild] = []
        for part, name, profile in zip(parts, names, profiles, strict=True):
            library = plugin_library if part["name"] != TOWER.name else None  # the tower has no LPWCA node
            runner, record = build_trt_engine(
                bundle / part["file"], scratch / name, manifest["precision"], profile, library, trt_options, steps
            )
            runners.append(runner)
            records.append(record)
        runner = join_parts(runners)
        report = check_parity(
            bundle,
            manifest,
            runner,
            reference_kind,
            model_override=model_override,
            ccra_module=ccra_module,
            steps=steps,
        )
        atomic.write_json(bundle / ENGINE_PARITY_FILE, report.to_dict())
        record = join_engine_records(tuple(PARTS[part["name"]] for part in parts), records)
        record["parity"] = EngineParity(file=ENGINE_PARITY_FILE, passed=report.passed, reference=report.reference)
        for name in names:
            (scratch / name).replace(bundle / name)
            manifest["files"][name] = file_entry(bundle / name)
        manifest["engine"] = record
        write_manifest(bundle, manifest)  # a format 2 bundle is written back in format 3
    except OSError as exc:
        raise BundleError(f"cannot write the engine ({exc.strerror or exc})", field="bundle", value=bundle) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report
