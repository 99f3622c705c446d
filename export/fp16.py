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
- every node around a tensor the FP32 graph showed beyond FP16's safe range (``keep_nodes``,
  from fp16_ranges.py): CLIP's outlier channels, LPWCA's F where the map is sharp, the projector
  reading it. A fused node among them reads FP32 features, so its F output stays FP32.
Graph inputs and outputs become FP16 (the mask stays int64); the manifest records the types.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from ccra_export.core.graph_scopes import CCRA_SCOPE, nodes_in_scope
from ccra_export.core.lpwca_schema import is_lpwca
from ccra_export.runtime.ort_session import import_onnxruntime

FP32_OP_TYPES = ("Softmax",)


def _lpwca_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if is_lpwca(n)]


def _lpwca_reads_fp16(proto: onnx.ModelProto, keep: frozenset[str] = frozenset()) -> None:
    """Feed each LPWCA node the FP16 tensor its FP32 Cast was made from; cast its outputs back.
    A node in ``keep`` stays FP32 throughout: its outputs (F) are beyond FP16's range."""
    producers = {out: n for n in proto.graph.node for out in n.output}
    casts = []
    for node in _lpwca_nodes(proto):
        if node.name in keep:
            continue
        cast = producers.get(node.input[0])
        to = next((a.i for a in cast.attribute if a.name == "to"), None) if cast is not None else None
        if cast is None or cast.op_type != "Cast" or to != onnx.TensorProto.FLOAT:
            continue
        node.input[0] = cast.input[0]
        for i, name in enumerate(list(node.output)):
            node.output[i] = f"{name}_fp16"
            casts.append(onnx.helper.make_node("Cast", [node.output[i]], [name], to=onnx.TensorProto.FLOAT))
    proto.graph.node.extend(casts)


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _elide_fp16_round_trips(proto: onnx.ModelProto) -> int:
    """Remove Cast(FP32->FP16)->Cast(FP16->FP32) pairs; returns how many were removed.

    The converter keeps each blocked node FP32 on its own: it casts the node's outputs back to
    FP16 and the next blocked node's inputs to FP32 again. Between two FP32 nodes, such as inside
    the CCRA module, the tensor then passes through FP16 anyway: rounded, and Inf past 65504 (the
    NaN visual tokens of a sharp LPWCA map). The FP32 tensor is used directly instead.
    """
    producers = {out: node for node in proto.graph.node for out in node.output}
    graph_outputs = {o.name for o in proto.graph.output}
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for node in proto.graph.node:
        if _cast_to(node) != onnx.TensorProto.FLOAT or node.output[0] in graph_outputs:
            continue
        to_fp16 = producers.get(node.input[0])
        if to_fp16 is None or _cast_to(to_fp16) != onnx.TensorProto.FLOAT16:
            continue
        source = to_fp16.input[0]
        if producers.get(source) is not None and _cast_to(producers[source]) == onnx.TensorProto.FLOAT16:
            continue  # the "FP32" source is itself an FP16 cast's output: nothing to gain
        rename[node.output[0]] = source
        dropped.add(id(node))
    if not rename:
        return 0
    kept = [n for n in proto.graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {name for n in kept for name in n.input} | graph_outputs
    kept = [n for n in kept if not (_cast_to(n) == onnx.TensorProto.FLOAT16 and n.output[0] not in used)]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return len(rename)


def convert_to_fp16(
    proto: onnx.ModelProto, *, keep_ccra_fp32: bool = True, keep_nodes: Sequence[str] = ()
) -> onnx.ModelProto:
    """Convert ``proto`` (in place) to FP16 with FP16 graph I/O and return it, topologically sorted.

    ``keep_nodes``: further nodes kept FP32, those around tensors FP16 cannot hold (fp16_ranges.py).
    """
    import onnx_ir as ir  # the [export] extra: importing this module must not need it (a runtime-only install)

    float16 = import_onnxruntime("onnxruntime.transformers.float16")
    blocked_nodes = nodes_in_scope(proto, CCRA_SCOPE) if keep_ccra_fp32 else []
    blocked_nodes += [n.name for n in _lpwca_nodes(proto) if n.name not in blocked_nodes]
    blocked_nodes += [n for n in keep_nodes if n not in blocked_nodes]
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
    _elide_fp16_round_trips(converted)
    _lpwca_reads_fp16(converted, frozenset(keep_nodes))
    model = ir.from_proto(converted)
    model.graph.sort()
    return ir.to_proto(model)
