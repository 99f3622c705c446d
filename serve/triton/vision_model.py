"""``ccra_vision`` on Triton's Python backend: the bundle's ONNX graph in ONNX Runtime.

The same class serves each graph of a split bundle (``ccra_vision_tower``, ``ccra_head``): the
config's ``graph`` parameter names the ONNX file, its inputs and outputs the tensors.

For a Triton without the ONNX Runtime or TensorRT backend (PyPI's nvidia-pytriton ships only the
Python backend) and for fused graphs, whose ccra::LPWCA node runs through the CPU kernel that
ccra-export registers with ONNX Runtime from Python. Triton's dynamic batcher hands ``execute``
several requests at once; requests of the same shapes (the same prompt length, for CCRA's text
input) are concatenated along the batch axis and run as one batch, so a batched answer is
exactly the one each request would get alone.

The repository's ``ccra_vision/1/model.py`` (or the split models' ``1/model.py``) subclasses
``VisionModel`` and sets ``pb`` to ``triton_python_backend_utils``, which exists only inside the
stub process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ccra_export.runtime.vision_backend import OrtBackend, available_providers, cuda_provider_options
from ccra_export.serve.triton.config import VISION_MODEL
from ccra_export.serve.triton.tensors import from_numpy, to_numpy


def instance_providers(args: dict[str, str], precision: str | None) -> list[Any]:
    """ONNX Runtime providers for this model instance: CUDA on the instance's GPU for a KIND_GPU
    instance group when this ONNX Runtime has CUDA (TF32 off for FP32 graphs), else the CPU."""
    if args.get("model_instance_kind") != "GPU" or "CUDAExecutionProvider" not in available_providers():
        return ["CPUExecutionProvider"]
    options = {**cuda_provider_options(precision), "device_id": args.get("model_instance_device_id", "0")}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def parameter(config: dict[str, Any], key: str, default: str | None = None) -> str | None:
    """A ``parameters`` entry of a model config (as Triton hands it to ``initialize``)."""
    entry = config.get("parameters", {}).get(key)
    return entry["string_value"] if entry else default


def group_by_shape(feeds: list[dict[str, np.ndarray]]) -> dict[tuple, list[int]]:
    """Indices of requests whose inputs have identical shapes (they can share one batch)."""
    groups: dict[tuple, list[int]] = {}
    for index, feed in enumerate(feeds):
        key = tuple((name, array.shape[1:]) for name, array in sorted(feed.items()))
        groups.setdefault(key, []).append(index)
    return groups


class VisionModel:
    """Triton Python-backend model: batched ONNX Runtime inference of the vision graph."""

    pb: Any = None  # triton_python_backend_utils, set by the generated model.py

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        graph = version_dir / (parameter(config, "graph") or "vision.onnx")
        self.backend = OrtBackend(graph, providers=instance_providers(args, parameter(config, "precision")))
        self.inputs = [spec["name"] for spec in config["input"]]
        self.outputs = [spec["name"] for spec in config["output"]]
        self.model_name = config.get("name") or VISION_MODEL

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds = [
            {name: to_numpy(self.pb.get_input_tensor_by_name(request, name)) for name in self.inputs}
            for request in requests
        ]
        responses: list[Any] = [None] * len(requests)
        for indices in group_by_shape(feeds).values():
            try:
                outputs = self.backend.run({n: np.concatenate([feeds[i][n] for i in indices]) for n in self.inputs})
            except Exception as exc:  # one bad group fails its own requests, not the whole batch
                for i in indices:
                    responses[i] = self.pb.InferenceResponse(error=self.pb.TritonError(f"{self.model_name}: {exc}"))
                continue
            start = 0
            for i in indices:
                size = feeds[i][self.inputs[0]].shape[0]
                tensors = [from_numpy(self.pb, n, outputs[n][start : start + size]) for n in self.outputs]
                responses[i] = self.pb.InferenceResponse(output_tensors=tensors)
                start += size
        return responses
