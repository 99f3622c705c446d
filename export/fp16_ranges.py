"""Which tensors FP16 cannot hold, read from the FP32 graph's own activations (auto mixed precision).

The FP16 conversion keeps Softmax and the CCRA module FP32 by rule; that is not enough. CLIP's
residual stream has outlier channels, and where LPWCA's map is sharp its fused features
F = sum_l alpha * G * V (G up to L*N) leave the FP32 island far above FP16's 65504: the cast back
to FP16 at the island's edge, or the projector after it, turns them into Inf and every visual
token into NaN. As ONNX Runtime's auto mixed precision does, the FP32 graph runs on the parity
inputs with every float tensor exposed (in chunks, so memory stays bounded), and every tensor
whose magnitude exceeds a safe bound keeps its producer and its consumers in FP32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ccra_export.core import lpwca_schema
from ccra_export.core.parity import KeptFP32
from ccra_export.runtime.vision_backend import OrtBackend

FP16_MAX = 65504.0
SAFE_BOUND = FP16_MAX / 8  # headroom for inputs the parity samples did not show
CHUNK = 256  # tensors exposed per run


@dataclass(frozen=True)
class OverRange:
    tensor: str
    max_abs: float
    nodes: tuple[str, ...]  # its producer and consumers, kept FP32

    def to_dict(self, graph: str | None = None) -> KeptFP32:
        """parity.json's row (``fp16_kept_fp32``); ``graph``: the file it is in, for a split bundle."""
        row = KeptFP32(tensor=self.tensor, max_abs=self.max_abs, nodes=list(self.nodes))
        if graph is not None:
            row["graph"] = graph
        return row


def float_tensors(proto: onnx.ModelProto) -> list[str]:
    """Every FP32 tensor a node produces (shape inference tells which are float)."""
    types = lpwca_schema.tensor_types(proto)
    return [out for node in proto.graph.node for out in node.output if types.get(out) == onnx.TensorProto.FLOAT]


def activation_ranges(fp32_graph: Path, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """max |x| over the finite values of every float tensor of ``fp32_graph`` on ``feeds``
    (infinities are intended there, e.g. masked logits, and FP16 holds them too)."""
    names = float_tensors(onnx.load(str(fp32_graph), load_external_data=False))
    ranges: dict[str, float] = {}
    for start in range(0, len(names), CHUNK):
        chunk = names[start : start + CHUNK]
        outputs = OrtBackend(fp32_graph, extra_outputs=chunk).run(feeds)
        for name in chunk:
            values = np.abs(np.asarray(outputs[name], dtype=np.float32))
            finite = values[np.isfinite(values)]
            ranges[name] = float(finite.max()) if finite.size else 0.0
    return ranges


def over_range(proto: onnx.ModelProto, ranges: dict[str, float], bound: float = SAFE_BOUND) -> list[OverRange]:
    """The tensors above ``bound``, each with the nodes that must stay FP32 around it."""
    producers = {out: node.name for node in proto.graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    found = []
    for tensor, magnitude in ranges.items():
        if magnitude > bound:
            nodes = (
                [producers[tensor], *consumers.get(tensor, [])] if tensor in producers else consumers.get(tensor, [])
            )
            found.append(OverRange(tensor, magnitude, tuple(dict.fromkeys(nodes))))
    return found
