"""Run graphs holding ``ccra::LPWCA`` in ONNX Runtime on CPU, through the C++ CPU kernel.

Why onnxruntime-extensions: a native ORT custom-op library must be compiled against ONNX
Runtime's C API headers, and neither the onnxruntime wheel nor any package registry reachable
here ships them. onnxruntime-extensions (a pip wheel, no dependencies) hosts custom ops defined
in Python; ours is a thin shim that hands the tensors to the C++ kernel through ctypes, so the
arithmetic is the same C++ code (and per-position math header) the CUDA kernel shares.

Its Python ops live in the ``ai.onnx.contrib`` domain, and it declares one input type per op
(float32), so the session gets an in-memory copy of the graph with each LPWCA node moved to
that domain, and with casts around FP16 features (F back to FP16; the attention map is FP32 in
the node's contract whatever the features). The bundle's graph on disk is not modified:
TensorRT's parser and every other consumer see the ``ccra::LPWCA`` node as exported.
"""

from __future__ import annotations

import functools

import onnx

from ccra_export.core import lpwca_schema
from ccra_export.core.lpwca_schema import KERNEL_ATTRIBUTES, OP_TYPE, is_lpwca
from ccra_export.runtime.lpwca_cpu import lpwca_cpu

ORTX_DOMAIN = "ai.onnx.contrib"
# The C++ kernel parallelises with OpenMP; ORT's intra-op threads spinning meanwhile would take
# the same cores away from it.
NO_SPINNING = {"session.intra_op.allow_spinning": "0"}


@functools.cache
def custom_ops_library() -> str:
    """Register the LPWCA Python op (once per process); returns the library ORT must load."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    @onnx_op(
        op_type=OP_TYPE,
        inputs=[PyCustomOpDef.dt_float] * 3,
        outputs=[PyCustomOpDef.dt_float] * 2,
        attrs={
            name: PyCustomOpDef.dt_int64 if name == "num_heads" else PyCustomOpDef.dt_float
            for name in KERNEL_ATTRIBUTES
        },
    )
    def _lpwca(features, query_weights, query_bias, **attributes):  # noqa: ANN001
        return lpwca_cpu(features, query_weights, query_bias, **attributes)

    return get_library_path()


def has_lpwca(proto: onnx.ModelProto) -> bool:
    return any(is_lpwca(n) for n in proto.graph.node)


def rewrite_for_ort(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Move LPWCA nodes to the onnxruntime-extensions domain, FP32 at their boundary (in place)."""
    types = lpwca_schema.tensor_types(proto)  # registers the schema too
    nodes = []
    for node in proto.graph.node:
        if not is_lpwca(node):
            nodes.append(node)
            continue
        node.domain = ORTX_DOMAIN
        kept = [a for a in node.attribute if a.name in KERNEL_ATTRIBUTES]
        del node.attribute[:]
        node.attribute.extend(kept)
        half = types.get(node.input[0]) == onnx.TensorProto.FLOAT16
        if half:
            cast_in = f"{node.name}_features_fp32"
            nodes.append(onnx.helper.make_node("Cast", [node.input[0]], [cast_in], to=onnx.TensorProto.FLOAT))
            node.input[0] = cast_in
            fused = node.output[0]  # output 1, the attention map, is FP32 already
            node.output[0] = f"{fused}_fp32"
        nodes.append(node)
        if half:
            nodes.append(onnx.helper.make_node("Cast", [f"{fused}_fp32"], [fused], to=onnx.TensorProto.FLOAT16))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.graph.value_info[:]
    if not any(o.domain == ORTX_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(ORTX_DOMAIN, 1))
    return proto
