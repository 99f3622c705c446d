"""FP32 -> FP16 ONNX conversion that keeps the overflow-prone parts in FP32.

Uses ONNX Runtime's ``float16`` converter (the tool the ORT transformer optimizer uses), with:
- ``Softmax`` blocked from FP16: its inputs and accumulation stay FP32 (large logits overflow).
- ``LayerNormalization`` converted, because the exporter writes ``stash_type=1``: ONNX then
  defines the mean/variance in FP32 whatever the I/O type, and TensorRT's parser honours it.
- every node of the CCRA module kept FP32 (unless ``keep_ccra_fp32=False``): LPWCA multiplies
  features by G = L*N*A, up to L*N (13,248 for llava-1.5-7b) where attention peaks, which
  overflows FP16 on CLIP's large-magnitude channels. It is ~4% of the graph's FLOPs.
- the fused ``ccra::LPWCA`` node reads the FP16 features directly (it is memory-bound: half
  the bytes) while its small folded-query inputs stay FP32, as the kernels and schema require.
Graph inputs and outputs become FP16 (the mask stays int64); the manifest records the types.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnxruntime.transformers import float16

from ccra_export.core.graph_scopes import CCRA_SCOPE, nodes_in_scope
from ccra_export.core.lpwca_schema import is_lpwca

FP32_OP_TYPES = ("Softmax",)


def _lpwca_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if is_lpwca(n)]


def _lpwca_reads_fp16(proto: onnx.ModelProto) -> None:
    """Feed each LPWCA node the FP16 tensor its FP32 Cast was made from; cast its outputs back."""
    producers = {out: n for n in proto.graph.node for out in n.output}
    casts = []
    for node in _lpwca_nodes(proto):
        cast = producers.get(node.input[0])
        to = next((a.i for a in cast.attribute if a.name == "to"), None) if cast is not None else None
        if cast is None or cast.op_type != "Cast" or to != onnx.TensorProto.FLOAT:
            continue
        node.input[0] = cast.input[0]
        for i, name in enumerate(list(node.output)):
            node.output[i] = f"{name}_fp16"
            casts.append(onnx.helper.make_node("Cast", [node.output[i]], [name], to=onnx.TensorProto.FLOAT))
    proto.graph.node.extend(casts)


def convert_to_fp16(proto: onnx.ModelProto, *, keep_ccra_fp32: bool = True) -> onnx.ModelProto:
    """Convert ``proto`` (in place) to FP16 with FP16 graph I/O and return it, topologically sorted."""
    blocked_nodes = nodes_in_scope(proto, CCRA_SCOPE) if keep_ccra_fp32 else []
    blocked_nodes += [n.name for n in _lpwca_nodes(proto) if n.name not in blocked_nodes]
    converted = float16.convert_float_to_float16(
        proto,
        keep_io_types=False,
        op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *FP32_OP_TYPES],
        node_block_list=blocked_nodes,
    )
    # The converter leaves intermediate value_info with stale element types and appends its Cast
    # nodes at the end of the node list. Shape inference recomputes the former; ONNX requires
    # topological order (ORT tolerates the disorder, onnx.checker and TensorRT's parser do not).
    del converted.graph.value_info[:]
    _lpwca_reads_fp16(converted)
    model = ir.from_proto(converted)
    model.graph.sort()
    return ir.to_proto(model)
