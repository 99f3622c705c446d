"""ONNX validity checks every exported graph must pass before anything runs it."""

from __future__ import annotations

from pathlib import Path

import onnx

from ccra_export.core import lpwca_schema
from ccra_export.core.errors import CCRAExportError
from ccra_export.core.manifest import tensor_spec
from ccra_export.core.manifest_schema import GraphInterface, TensorSpec


class GraphCheckError(CCRAExportError):
    """An exported graph is not valid ONNX: an exporter bug, reported with the checker's reason."""


def check_graph(path: Path) -> onnx.ModelProto:
    """``onnx.checker`` full check (which runs strict shape inference) on the saved file.

    Path-based, so graphs with external data and over 2 GB are checked too. Returns the
    graph without weights, for reading its interface.
    """
    lpwca_schema.register()  # fused graphs hold ccra::LPWCA nodes
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise GraphCheckError(f"{path.name}: fails onnx.checker full check: {reason}") from None
    return onnx.load(str(path), load_external_data=False)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in dims]


def graph_interface(proto: onnx.ModelProto) -> GraphInterface:
    """Inputs, outputs (name, dtype, shape with symbolic axes), opsets and IR version."""

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        elem = value.type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name
        return tensor_spec(value.name, dtype, _dims(value))

    initializers = {t.name for t in proto.graph.initializer}
    return GraphInterface(
        inputs=[spec(v) for v in proto.graph.input if v.name not in initializers],
        outputs=[spec(v) for v in proto.graph.output],
        opset={op.domain or "ai.onnx": op.version for op in proto.opset_import},
        ir_version=proto.ir_version,
    )
