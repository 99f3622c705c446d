"""ccra-export: ONNX / TensorRT deployment of CCRA vision-language models.

Importing the package is cheap and torch-free; stages import their heavy dependencies lazily.
"""

__version__ = "0.1.0"
