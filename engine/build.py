"""A TensorRT engine for a bundle's ONNX graph: the typing plan, the build, and its manifest record."""

from __future__ import annotations

from pathlib import Path

import onnx

from ccra_export.core.console import SILENT, Steps
from ccra_export.core.hashing import sha256_file
from ccra_export.core.manifest_schema import EngineBuild, EnginePartRecord, EngineRecord, EngineTarget
from ccra_export.core.platform import gpus
from ccra_export.core.plugin_library import check_plugin_library
from ccra_export.core.vision_graphs import GraphPart
from ccra_export.engine.plan import Profile, TrtVersion, engine_record, fp32_islands, precision_plan
from ccra_export.engine.settings import TrtOptions
from ccra_export.engine.timing_cache import keyed_path
from ccra_export.runtime.vision_backend import VisionBackend


def build_trt_engine(
    graph: Path,
    engine_path: Path,
    precision: str,
    profile: Profile,
    plugin_library: Path | None,
    trt_options: TrtOptions,
    steps: Steps = SILENT,
) -> tuple[VisionBackend, EngineBuild]:
    """Build ``engine_path`` from the ONNX ``graph`` with TensorRT; the backend running it and its
    manifest record (TensorRT version, GPU, compute capability, plugin hash, typing, profile).

    The plugin library is hashed once: that hash is what the record keeps and what the runtime
    checks the installed library against before loading it (runtime/engine_compat.py)."""
    import tensorrt as trt  # optional: only reached where tensorrt_status() said it is usable

    from ccra_export.engine import trt_builder
    from ccra_export.runtime import trt_engine

    plan = precision_plan(TrtVersion.parse(trt.__version__), precision, trt_options.typing)
    steps.info(f"engine: {plan.why}")
    plugin = (check_plugin_library(plugin_library), sha256_file(plugin_library)) if plugin_library else None
    name, cc = (gpus() or [("unknown GPU", "unknown")])[0]
    cache = trt_options.timing_cache
    cache_path = keyed_path(cache, name, cc, trt.__version__) if cache is not None else None
    with steps.step("Building the TensorRT engine (minutes on a Jetson)") as update:
        islands: frozenset[str] = frozenset()
        names: frozenset[str] = frozenset()
        if plan.pin_fp32:
            proto = onnx.load(str(graph), load_external_data=False)
            islands, names = frozenset(fp32_islands(proto, precision)), frozenset(n.name for n in proto.graph.node)
            steps.info(f"engine: {len(islands)} ONNX nodes pinned to FP32 (weak typing)")
        serialized = trt_builder.build_engine(
            graph, plan, profile, trt_options, plugin, update, islands, names, cache_path=cache_path, warn=steps.warn
        )
    engine_path.write_bytes(serialized)
    record = engine_record(
        trt.__version__,
        name,
        cc,
        plugin[1] if plugin else None,
        plan,
        profile,
        {
            "file": engine_path.name,
            "workspace_mib": trt_options.workspace_mib,
            "optimization_level": trt_options.optimization_level,
        },
    )
    return trt_engine.TensorRTBackend(engine_path, plugin), record


def join_engine_records(parts: tuple[GraphPart, ...], records: list[EngineBuild]) -> EngineRecord:
    """The manifest's ``engine``: what the build's engines share (TensorRT, GPU, plugin) once, and
    each graph's own engine under ``parts``, in the graphs' order (one part for a single graph)."""
    first = records[0]
    target = EngineTarget(
        tensorrt_version=first["tensorrt_version"],
        gpu=first["gpu"],
        compute_capability=first["compute_capability"],
        plugin_sha256=next((r["plugin_sha256"] for r in records if r["plugin_sha256"]), None),
    )
    own = [
        EnginePartRecord(
            part=part.name,
            file=record["file"],
            strongly_typed=record["strongly_typed"],
            builder_flags=record["builder_flags"],
            profile=record["profile"],
            workspace_mib=record["workspace_mib"],
            optimization_level=record["optimization_level"],
        )
        for part, record in zip(parts, records, strict=True)
    ]
    return EngineRecord(**target, parts=own)


def engine_files(engine: EngineRecord) -> list[str]:
    """The engine files an ``engine`` record names."""
    return [record["file"] for record in engine["parts"]]
