"""Module scopes the PyTorch exporter records on ONNX nodes (onnx only, no torch).

Precision passes select nodes by the PyTorch module they came from: FP16 keeps the CCRA module in
FP32, INT8 keeps it unquantized, the per-layer report finds each encoder layer's output.
"""

from __future__ import annotations

import ast

import onnx

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CCRA_SCOPE = "ccra"


def node_scope(node: onnx.NodeProto) -> list[str]:
    """Module path the exporter recorded for a node: ['', 'ccra', 'ccra.key', ...]."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                return list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return []
    return []


def in_scope(node: onnx.NodeProto, scope: str) -> bool:
    """Whether ``node`` was traced inside the submodule ``scope`` (a full dotted module path,
    e.g. ``ccra`` or ``vision_tower.encoder.layers.3``): the exporter records every enclosing one."""
    return scope in node_scope(node)


def nodes_in_scope(proto: onnx.ModelProto, scope: str) -> list[str]:
    return [n.name for n in proto.graph.node if in_scope(n, scope)]
