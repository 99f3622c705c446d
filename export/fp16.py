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
Graph inputs and outputs become FP16 (the mask stays int64), except the LPWCA map
``lpwca_attention``, which stays FP32 from its softmax (or fused node) to the graph output in both
variants: it sums to 1 over L*N positions, so its mean 1/(L*N) (7.5e-5 at llava-1.5-7b sizes) is
below FP16's smallest normal 6.1e-5, and an FP16 map would be mostly subnormal (10 bits or fewer,
flushed to zero by some kernels). The manifest records the types the graph declares.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from ccra_export.core.graph_scopes import CCRA_SCOPE, nodes_in_scope
from ccra_export.core.lpwca_schema import is_lpwca
from ccra_export.core.vision_graphs import LPWCA_ATTENTION
from ccra_export.runtime.ort_session import import_onnxruntime

FP32_OP_TYPES = ("Softmax",)
#: graph outputs an FP16 graph gives in FP32 (the module docstring says why)
FP32_OUTPUTS = (LPWCA_ATTENTION,)
#: the most nodes between a map's softmax and its graph output (the portable graph has two:
#: the mean over heads and a reshape); a longer chain is not recognised as the map's
MAP_CHAIN_LIMIT = 8


def _lpwca_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if is_lpwca(n)]


def _lpwca_reads_fp16(proto: onnx.ModelProto, keep: frozenset[str] = frozenset()) -> None:
    """Feed each LPWCA node the FP16 tensor its FP32 Cast was made from; cast its F output back to
    FP32 for the blocked nodes after it (its map, output 1, is FP32 whatever the features: the
    schema). A node in ``keep`` stays FP32 throughout: its outputs (F) are beyond FP16's range."""
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
        fused = node.output[0]
        node.output[0] = f"{fused}_fp16"
        casts.append(onnx.helper.make_node("Cast", [node.output[0]], [fused], to=onnx.TensorProto.FLOAT))
    proto.graph.node.extend(casts)


def _map_chain(proto: onnx.ModelProto, output: str) -> list[str]:
    """The nodes between graph output ``output`` and the softmax (or fused LPWCA node) that makes
    it, e.g. the mean over heads and the reshape of the portable graph; empty when the output is
    not made that way within ``MAP_CHAIN_LIMIT`` nodes (a plug-in module's own map)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    chain: list[str] = []
    name = output
    for _ in range(MAP_CHAIN_LIMIT):
        node = producers.get(name)
        if node is None or not node.name or not node.input:
            return []
        if node.op_type == "Softmax" or is_lpwca(node):
            return chain
        chain.append(node.name)
        name = node.input[0]
    return []


def _keep_outputs_fp32(proto: onnx.ModelProto, names: Sequence[str], fp32_nodes: frozenset[str]) -> list[str]:
    """Give the graph outputs ``names`` in FP32; returns those changed.

    The converter casts every float output to FP16 at the boundary, after the FP32 node that made
    it. That cast is removed and the FP32 tensor becomes the output (consumers inside the graph
    keep an FP16 copy). ``fp32_nodes``: the nodes kept FP32 (their float outputs are FP32). Where
    the output's producer is no such node (a map computed in FP16), a cast to FP32 at the boundary
    keeps the interface the same.
    """
    producers = {out: node for node in proto.graph.node for out in node.output}
    boundary = {v.name for v in [*proto.graph.input, *proto.graph.output]} | {t.name for t in proto.graph.initializer}
    changed = []
    for value in proto.graph.output:
        name = value.name
        producer = producers.get(name)
        if name not in names or producer is None or value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        changed.append(name)
        fp16 = f"{name}_fp16"
        consumers = any(name in node.input for node in proto.graph.node)
        source = producer.input[0] if _cast_to(producer) == onnx.TensorProto.FLOAT16 else None
        maker = producers.get(source) if source is not None else None
        if (
            maker is not None
            and source not in boundary
            and (maker.name in fp32_nodes or _cast_to(maker) == onnx.TensorProto.FLOAT)
        ):
            if consumers:  # they read FP16: they keep the cast, under another name
                producer.output[0] = fp16
            else:
                proto.graph.node.remove(producer)
            renames = {name: fp16, source: name} if consumers else {source: name}
            for node in proto.graph.node:
                _rename(node, renames)
            continue
        for node in proto.graph.node:
            _rename(node, {name: fp16})
        cast = onnx.helper.make_node("Cast", [fp16], [name], name=f"{name}_to_fp32", to=onnx.TensorProto.FLOAT)
        proto.graph.node.append(cast)
    return changed


def _rename(node: onnx.NodeProto, names: dict[str, str]) -> None:
    for i, name in enumerate(node.input):
        node.input[i] = names.get(name, name)
    for i, name in enumerate(node.output):
        node.output[i] = names.get(name, name)


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
    """Convert ``proto`` (in place) to FP16 with FP16 graph I/O (``FP32_OUTPUTS`` stay FP32) and
    return it, topologically sorted.

    ``keep_nodes``: further nodes kept FP32, those around tensors FP16 cannot hold (fp16_ranges.py).
    """
    import onnx_ir as ir  # the [export] extra: importing this module must not need it (a runtime-only install)

    float16 = import_onnxruntime("onnxruntime.transformers.float16")
    blocked_nodes = nodes_in_scope(proto, CCRA_SCOPE) if keep_ccra_fp32 else []
    blocked_nodes += [n.name for n in _lpwca_nodes(proto) if n.name not in blocked_nodes]
    # the map's few nodes after its softmax stay FP32 with the CCRA module in FP16 too (--ccra-fp16)
    map_nodes = [n for out in FP32_OUTPUTS for n in _map_chain(proto, out)]
    blocked_nodes += [n for n in [*keep_nodes, *map_nodes] if n not in blocked_nodes]
    op_block_list = [*float16.DEFAULT_OP_BLOCK_LIST, *FP32_OP_TYPES]
    fp32_nodes = frozenset(blocked_nodes) | {n.name for n in proto.graph.node if n.op_type in op_block_list}
    fp32_nodes -= {""}  # a nameless node is never taken for a kept one
    converted = float16.convert_float_to_float16(
        proto, keep_io_types=False, op_block_list=op_block_list, node_block_list=blocked_nodes
    )
    # The converter leaves intermediate value_info with stale element types and appends its Cast
    # nodes at the end of the node list. Shape inference recomputes the former; ONNX requires
    # topological order (ORT tolerates the disorder, onnx.checker and TensorRT's parser do not).
    del converted.graph.value_info[:]
    _elide_fp16_round_trips(converted)
    _lpwca_reads_fp16(converted, frozenset(keep_nodes))
    _keep_outputs_fp32(converted, FP32_OUTPUTS, fp32_nodes)
    model = ir.from_proto(converted)
    model.graph.sort()
    return ir.to_proto(model)
