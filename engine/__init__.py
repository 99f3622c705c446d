"""TensorRT (``ccra_export.engine``): typing plan, optimization profiles, engine builds and their
manifest record, ONNX Runtime's TensorRT execution provider options.

The decisions are TensorRT-free and tested on CPU; only ``build.py`` imports tensorrt, lazily.
No torch: a Jetson builds its engine without PyTorch.
"""
