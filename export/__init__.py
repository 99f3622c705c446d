"""PyTorch -> ONNX (``ccra_export.export``): the vision graph (portable or with the fused LPWCA
node), FP16 conversion, graph checks, the language model.

Import the submodules: ``onnx_export``, ``fp16`` and ``lpwca_op`` need torch; ``graph_checks``
does not, so torch-free code can check a graph without loading PyTorch.
"""
