"""Refusing an engine this machine cannot run, before TensorRT tries to deserialise it.

The engine stage records what an engine was built for (``ccra_export.engine.plan.engine_record``);
the runtime checks that record on load. TensorRT-free, so CI tests it.
"""

from __future__ import annotations

from ccra_export.core.errors import BundleError, Remedy
from ccra_export.core.manifest_schema import EngineBuild


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
        reasons.append("the LPWCA plugin library differs from the one serialised with it")
    if reasons:
        raise BundleError(
            f"engine mismatch: {'; '.join(reasons)}: rebuild it here from the bundle's portable ONNX graph",
            remedy=Remedy("engine", (("bundle", bundle), ("force", True))),
        )
