"""A TensorRT engine for a bundle's ONNX graph: the typing plan, the build, and its manifest record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from ccra_export.core.console import SILENT, Steps
from ccra_export.core.hashing import sha256_file
from ccra_export.core.manifest import ENGINE_FILE
from ccra_export.core.platform import gpus
from ccra_export.engine.plan import Profile, TrtVersion, engine_record, fp32_islands, precision_plan
from ccra_export.engine.settings import TrtOptions
from ccra_export.runtime.vision_backend import VisionBackend


def build_trt_engine(
    graph: Path,
    engine_path: Path,
    precision: str,
    profile: Profile,
    plugin_library: Path | None,
    trt_options: TrtOptions,
    steps: Steps = SILENT,
) -> tuple[VisionBackend, dict[str, Any]]:
    """Build ``engine_path`` from the ONNX ``graph`` with TensorRT; the backend running it and its
    manifest record (TensorRT version, GPU, compute capability, plugin hash, typing, profile)."""
    import tensorrt as trt  # optional: only reached where tensorrt_status() said it is usable

    from ccra_export.engine import trt_builder
    from ccra_export.runtime import trt_engine

    plan = precision_plan(TrtVersion.parse(trt.__version__), precision, trt_options.typing)
    steps.info(f"engine: {plan.why}")
    libraries = [plugin_library] if plugin_library else []
    with steps.step("Building the TensorRT engine (minutes on a Jetson)") as update:
        islands: frozenset[str] = frozenset()
        names: frozenset[str] = frozenset()
        if plan.pin_fp32:
            proto = onnx.load(str(graph), load_external_data=False)
            islands, names = frozenset(fp32_islands(proto, precision)), frozenset(n.name for n in proto.graph.node)
            steps.info(f"engine: {len(islands)} ONNX nodes pinned to FP32 (weak typing)")
        serialized = trt_builder.build_engine(graph, plan, profile, trt_options, libraries, update, islands, names)
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
