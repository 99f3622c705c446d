"""PyTorch -> ONNX export of the CCRA vision graph (``ccra_export.export``). Needs torch."""

from ccra_export.export.fp16 import convert_to_fp16
from ccra_export.export.graph_checks import check_graph, graph_interface
from ccra_export.export.onnx_export import DEFAULT_OPSET, export_model_proto, save_model

__all__ = ["DEFAULT_OPSET", "check_graph", "convert_to_fp16", "export_model_proto", "graph_interface", "save_model"]
