"""INT8 calibration (``ccra_export.calibration``): images, preprocessing, Q/DQ quantization, caches.

Needs onnx, onnxruntime, numpy and Pillow only (no torch), per shared/DESIGN.md.
"""
