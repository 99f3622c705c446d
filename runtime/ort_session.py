"""What to hand ``onnxruntime.InferenceSession`` for a bundle graph.

Most graphs load from their path unchanged. Two cases need an in-memory copy of the graph:
fused graphs (``ccra::LPWCA`` nodes are moved to onnxruntime-extensions' domain, lpwca_ort.py)
and debugging runs that read intermediate tensors (``extra_outputs``, e.g. the INT8 per-layer
report). The bundle file on disk is never modified; external weights stay where they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from ccra_export.runtime.lpwca_ort import NO_SPINNING, custom_ops_library, has_lpwca, rewrite_for_ort

EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


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
