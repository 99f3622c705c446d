"""Which layer's output drifts first: INT8 vs FP32 graphs, tensor by tensor, on the same inputs.

Taps are the output of every vision encoder layer, of the CCRA module and the visual tokens, found
through the module scopes the exporter recorded. The FP32 graph is the reference here: its
final outputs are themselves parity-checked against PyTorch in the same report.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

from ccra_export.core.graph_scopes import CCRA_SCOPE, in_scope, node_scope
from ccra_export.core.parity import LayerDrift, compare_output, thresholds_for
from ccra_export.runtime.vision_backend import OrtBackend

_LAYER_SCOPE = re.compile(r"^vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)$")


def layer_taps(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(label, tensor name) in graph order: encoder layers 1..n, the CCRA module, visual tokens."""
    last_in_scope: dict[str, str] = {}
    for node in proto.graph.node:  # topological order: the last node of a scope is its output
        for scope in node_scope(node):
            match = _LAYER_SCOPE.match(scope)
            if match is not None:
                last_in_scope[f"vision layer {int(match[1]) + 1}"] = node.output[0]
        if in_scope(node, CCRA_SCOPE):
            last_in_scope["ccra module"] = node.output[0]
    ordered = sorted((k for k in last_in_scope if k.startswith("vision layer")), key=lambda k: int(k.split()[-1]))
    taps = [(k, last_in_scope[k]) for k in ordered]
    if "ccra module" in last_in_scope:
        taps.append(("ccra module", last_in_scope["ccra module"]))
    output = proto.graph.output[0].name  # visual_tokens; a split bundle's tower: tower_features
    taps.append((output.replace("_", " "), output))
    return taps


def per_layer_drift(
    fp32_model: Path, int8_model: Path, feeds: dict[str, np.ndarray]
) -> tuple[list[LayerDrift], str | None]:
    """Drift per tap and the first tap below the INT8 cosine threshold (None: none drifts)."""
    return per_layer_drift_chain([(fp32_model, int8_model)], feeds)


def per_layer_drift_chain(
    graphs: list[tuple[Path, Path]], feeds: dict[str, np.ndarray]
) -> tuple[list[LayerDrift], str | None]:
    """``per_layer_drift`` across graphs that run one after the other (a split bundle's tower then
    head): each INT8 graph reads the INT8 graph before it, each FP32 graph the FP32 one, as deployed,
    so the report spans both graphs and drift accumulates as it does at run time."""
    threshold = thresholds_for("int8")
    rows, first = [], None
    reference_feeds = candidate_feeds = dict(feeds)
    for fp32_model, int8_model in graphs:
        taps = layer_taps(onnx.load(str(fp32_model), load_external_data=False))
        names = [tensor for _, tensor in taps]
        fp32, int8 = OrtBackend(fp32_model, extra_outputs=names), OrtBackend(int8_model, extra_outputs=names)
        reference = fp32.run({k: reference_feeds[k] for k in fp32.input_dtypes})
        candidate = int8.run({k: candidate_feeds[k] for k in int8.input_dtypes})
        for label, tensor in taps:
            result = compare_output(tensor, candidate[tensor], reference[tensor], threshold)
            rows.append(LayerDrift(label, tensor, result.cosine, result.scaled_max_abs_err))
            if first is None and not result.passed:
                first = label
        reference_feeds = {**reference_feeds, **reference}
        candidate_feeds = {**candidate_feeds, **candidate}
    return rows, first
