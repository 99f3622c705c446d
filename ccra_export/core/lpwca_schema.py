"""The ``ccra::LPWCA`` ONNX operator: schema, type and shape inference (onnx only, no torch).

One node for CCRA stages 2 and 3 (shared/CCRA.md) in the folded form:

    features       V  [B, L, N, Dv]   T (float or float16)
    query_weights  Wq [B, H+1, Dv]    float: rows 0..H-1 are gamma_k * (W_k,h^T q_h) for each head,
                                      row H is W_lk^T (W_lq q), the layer-attention query
    query_bias     Qb [B, L, H]       float: beta_k . u_h + b_k,h . q_h + E_l,h . q_h
    -> fused       F  [B, N, Dv]      T
    -> attention   A  [B, L, N]       float (the LPWCA map, mean over heads; FP32 whatever T:
                                      its mean is 1/(L*N), below FP16's smallest normal at
                                      llava-1.5-7b sizes, so an FP16 map would be mostly subnormal)

Registering the schema lets ``onnx.checker`` (full check) and shape inference accept fused graphs.
``plugin_version`` / ``plugin_namespace`` follow the TensorRT ONNX parser's convention for
mapping a node to a plugin creator.
"""

from __future__ import annotations

import onnx
from onnx import defs
from onnx.defs import OpSchema

DOMAIN = "ccra"
OP_TYPE = "LPWCA"
VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "ccra"
FLOAT_TYPES = ["tensor(float)", "tensor(float16)"]
#: the attributes the kernels read (the plugin's fields); the plugin_* ones only route the node
KERNEL_ATTRIBUTES = ("num_heads", "epsilon", "head_scale", "layer_scale")


def is_lpwca(node: onnx.NodeProto) -> bool:
    return node.op_type == OP_TYPE and node.domain == DOMAIN


def _dims(type_proto: onnx.TypeProto) -> list[onnx.TensorShapeProto.Dimension] | None:
    tensor = type_proto.tensor_type
    return list(tensor.shape.dim) if tensor.HasField("shape") else None


def _known(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    return dim.dim_value if dim.HasField("dim_value") else None


def _check_equal(what: str, a: onnx.TensorShapeProto.Dimension, b: onnx.TensorShapeProto.Dimension) -> None:
    if _known(a) is not None and _known(b) is not None and _known(a) != _known(b):
        raise ValueError(f"ccra::LPWCA: {what}: {_known(a)} != {_known(b)}")


def _infer(ctx: onnx.shape_inference.InferenceContext) -> None:
    features, weights, bias = (ctx.get_input_type(i) for i in range(3))
    elem = features.tensor_type.elem_type
    heads_attr = ctx.get_attribute("num_heads")
    heads = heads_attr.i if heads_attr is not None else None
    v, w, b = _dims(features), _dims(weights), _dims(bias)
    if v is not None and len(v) != 4:
        raise ValueError(f"ccra::LPWCA: features must be rank 4 [B, L, N, Dv], got rank {len(v)}")
    if w is not None and len(w) != 3:
        raise ValueError("ccra::LPWCA: query_weights must be rank 3 [B, H+1, Dv]")
    if b is not None and len(b) != 3:
        raise ValueError("ccra::LPWCA: query_bias must be rank 3 [B, L, H]")
    if v is not None and w is not None:
        _check_equal("query_weights Dv vs features Dv", w[2], v[3])
        _check_equal("query_weights batch vs features batch", w[0], v[0])
    if w is not None and heads is not None and _known(w[1]) is not None and _known(w[1]) != heads + 1:
        raise ValueError(f"ccra::LPWCA: query_weights has {_known(w[1])} rows; num_heads {heads} needs {heads + 1}")
    if v is not None and b is not None:
        _check_equal("query_bias L vs features L", b[1], v[1])
        _check_equal("query_bias batch vs features batch", b[0], v[0])
    if b is not None and heads is not None and _known(b[2]) is not None and _known(b[2]) != heads:
        raise ValueError(f"ccra::LPWCA: query_bias has {_known(b[2])} heads; num_heads is {heads}")
    if v is None:
        outputs = [onnx.helper.make_tensor_type_proto(t, None) for t in (elem, onnx.TensorProto.FLOAT)]
    else:
        batch, layers, patches, width = v
        map_dims = [_as_value(d) for d in (batch, layers, patches)]
        outputs = [
            onnx.helper.make_tensor_type_proto(elem, [_as_value(d) for d in (batch, patches, width)]),
            onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, map_dims),
        ]
    for index, type_proto in enumerate(outputs):
        ctx.set_output_type(index, type_proto)


def _as_value(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param if dim.HasField("dim_param") else None


def _schema() -> OpSchema:
    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    schema = OpSchema(
        OP_TYPE,
        DOMAIN,
        VERSION,
        __doc__,
        inputs=[
            param("features", "T", "stacked ViT hidden states V [B, L, N, Dv]"),
            param("query_weights", "tensor(float)", "folded per-image query vectors [B, H+1, Dv]"),
            param("query_bias", "tensor(float)", "folded per-image score offsets [B, L, H]"),
        ],
        outputs=[
            param("fused", "T", "layer-fused, LPWCA-weighted features F [B, N, Dv]"),
            param("attention", "tensor(float)", "LPWCA attention map A [B, L, N], FP32 whatever T"),
        ],
        type_constraints=[("T", FLOAT_TYPES, "features and the fused output: float32 or float16")],
        attributes=[
            attr("num_heads", OpSchema.AttrType.INT, "attention heads H", required=True),
            attr("epsilon", onnx.helper.make_attribute("epsilon", 1e-5), "LayerNorm epsilon of LN_k"),
            attr("head_scale", OpSchema.AttrType.FLOAT, "LPWCA score scale, 1/sqrt(dh)", required=True),
            attr("layer_scale", OpSchema.AttrType.FLOAT, "layer-attention logit scale, 1/sqrt(da)", required=True),
            attr(
                "plugin_version",
                onnx.helper.make_attribute("plugin_version", PLUGIN_VERSION),
                "TensorRT plugin version",
            ),
            attr(
                "plugin_namespace", onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE), "plugin namespace"
            ),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer)
    return schema


def register() -> None:
    """Register ``ccra::LPWCA`` with onnx (idempotent)."""
    if not defs.has(OP_TYPE, VERSION, DOMAIN):
        defs.register_schema(_schema())


def tensor_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of ``proto`` (inputs, initializers, node outputs), by shape
    inference with ``ccra::LPWCA`` registered so fused graphs infer too."""
    register()
    graph = onnx.shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types
