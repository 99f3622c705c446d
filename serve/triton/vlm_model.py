"""``ccra_vlm`` on Triton's Python backend: image + prompt in, the answer out as it is generated.

The runtime's ``Pipeline`` does everything it does for `ccra-export run` (LLaVA-1.5's template,
tokenisation, CLIP preprocessing, CCRA's text input, splicing the visual tokens, prefill and
decode), with one difference: its vision backend is ``BlsVision``, which sends the vision feeds
to the ``ccra_vision`` model through Triton's business-logic scripting (BLS). So Triton's dynamic
batcher batches the vision graph across requests and instances, whatever runs it (TensorRT,
ONNX Runtime, or ONNX Runtime inside the Python backend).

For a split bundle (``build --split-vision``) the vision backend is the runtime's
``SplitVision`` over two ``BlsVision``: ``ccra_head`` is called for every request, and
``ccra_vision_tower`` only for an image whose tower output is not in this instance's
``TowerCache`` (``tower_cache_mib`` in the config), so a second question about an image costs
only the head.

The model is decoupled: with ``stream`` true (the default) every piece of text is one response
and an empty final response closes the stream (gRPC streaming, HTTP ``generate_stream``); with
``stream`` false the whole answer is one response (HTTP ``generate``). Each instance serves one
request at a time (the runtime's decoder holds one sequence); scale with the instance count or
with more Triton replicas.

The repository's ``ccra_vlm/1/model.py`` subclasses ``VlmModel`` and sets ``pb`` to
``triton_python_backend_utils``, which exists only inside the stub process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ccra_export.core.errors import CCRAExportError
from ccra_export.core.image_preprocess import ImageProcessorConfig
from ccra_export.core.manifest import read_manifest
from ccra_export.core.manifest_schema import Manifest, TensorSpec
from ccra_export.core.vision_graphs import HEAD, TOWER, WHOLE_CCRA, part_records
from ccra_export.runtime.backends import join_parts
from ccra_export.runtime.inputs import InputError
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB, TowerCache
from ccra_export.runtime.vision_backend import VisionBackend
from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.serve.images import decode_image
from ccra_export.serve.triton.config import (
    HEAD_MODEL,
    HEAD_MODEL_PARAMETER,
    SAMPLING_INPUTS,
    TOWER_CACHE_PARAMETER,
    TOWER_MODEL,
    TOWER_MODEL_PARAMETER,
    VISION_MODEL,
    VISION_MODEL_PARAMETER,
)
from ccra_export.serve.triton.tensors import from_numpy, read_bytes, read_scalar, read_text, text_tensor, to_numpy
from ccra_export.serve.triton.vision_model import parameter

LOG = logging.getLogger("ccra_export.serve.triton")
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MAX_PIXELS = 40_000_000


#: the runtime names the CLI's flags in its messages; a Triton client sent these inputs
_INPUT_NAMES = {
    "--max-new-tokens": "max_new_tokens",
    "--temperature": "temperature",
    "--top-p": "top_p",
    "--seed": "seed",
    "--prompt": "prompt",
    "--image": "image",
}


def client_message(exc: BaseException) -> str:
    """The runtime's one-line message with the request's input names in place of the CLI's flags."""
    message = str(exc)
    for flag, name in _INPUT_NAMES.items():
        message = message.replace(flag, name)
    return message


class Cancelled(Exception):
    """The client cancelled the request (or went away); raised inside the decode loop to stop it."""


class VisionModelError(CCRAExportError):
    """A vision model (ccra_vision, ccra_vision_tower, ccra_head) answered a BLS request with an error."""


class BlsVision(VisionBackend):
    """The vision-backend interface over a BLS request to another Triton model.

    ``inputs`` and ``outputs`` are the graph's tensor specs (``name``, ``dtype``, ...) as the
    manifest records them: ``graph.inputs``/``graph.outputs``, or one part record's for a split
    bundle's tower or head."""

    name = "triton-bls"

    def __init__(
        self, pb: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], model_name: str = VISION_MODEL
    ) -> None:
        self.pb, self.model_name = pb, model_name
        self._dtypes = {spec["name"]: np.dtype(spec["dtype"]) for spec in inputs}
        self._outputs = [spec["name"] for spec in outputs]

    @property
    def description(self) -> str:
        return f"Triton model {self.model_name} (BLS)"

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        return dict(self._dtypes)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self.pb.InferenceRequest(
            model_name=self.model_name,
            requested_output_names=self._outputs,
            inputs=[from_numpy(self.pb, name, array) for name, array in feeds.items()],
        )
        response = request.exec()
        if response.has_error():
            raise VisionModelError(f"{self.model_name}: {response.error().message()}")
        return {name: to_numpy(self.pb.get_output_tensor_by_name(response, name)) for name in self._outputs}


def decode_request_image(data: bytes, max_pixels: int, processor: ImageProcessorConfig | None = None) -> Image.Image:
    """The request's ``image`` tensor -> 8-bit RGB, through the shared bounded decoder (the
    padded square ``processor`` makes of it within ``max_pixels``)."""
    if not data:
        raise InputError("empty; send the encoded file (PNG, JPEG, ...) as a UINT8 vector", field="image")
    return decode_image(data, max_pixels, processor)


class VlmModel:
    """Triton Python-backend model (decoupled): the runtime's Pipeline with its vision graph on
    ``ccra_vision`` (a split bundle's on ``ccra_vision_tower`` and ``ccra_head``)."""

    pb: Any = None  # triton_python_backend_utils, set by the generated model.py

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        bundle = Path(args["model_repository"]) / args["model_version"] / (parameter(config, "bundle") or "bundle")
        manifest = read_manifest(bundle)
        self.pipeline = Pipeline.from_bundle(bundle, vision=self.vision(manifest, config))
        types = {spec["name"]: spec["data_type"] for spec in config["input"]}
        self.text_type = "string" if types.get("prompt") == "TYPE_STRING" else "uint8"
        self.max_new_tokens = int(parameter(config, "default_max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        self.max_pixels = int(parameter(config, "max_image_pixels") or DEFAULT_MAX_PIXELS)
        self.pipeline.max_pixels = self.max_pixels  # what preprocessing may hold, the padded square included

    def vision(self, manifest: Manifest, config: dict[str, Any]) -> VisionBackend:
        """The pipeline's vision backend: BLS to ccra_vision, or for a split bundle the tower
        (only on a tower-cache miss) and the head, joined by the runtime's ``SplitVision``."""
        models = {
            WHOLE_CCRA.name: parameter(config, VISION_MODEL_PARAMETER) or VISION_MODEL,
            TOWER.name: parameter(config, TOWER_MODEL_PARAMETER) or TOWER_MODEL,
            HEAD.name: parameter(config, HEAD_MODEL_PARAMETER) or HEAD_MODEL,
        }
        runners: list[VisionBackend] = [
            BlsVision(self.pb, part["inputs"], part["outputs"], models[part["name"]]) for part in part_records(manifest)
        ]
        cache_mib = float(parameter(config, TOWER_CACHE_PARAMETER) or DEFAULT_TOWER_CACHE_MIB)
        return join_parts(runners, TowerCache.from_mib(cache_mib))

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self.serve(request)
        return None  # decoupled: every response went through the request's sender

    def sampling(self, request: Any) -> tuple[Sampling, bool]:
        """The request's optional inputs as a ``Sampling`` (greedy by default) and whether to stream."""
        value = {name: read_scalar(self.pb.get_input_tensor_by_name(request, name)) for name in SAMPLING_INPUTS}
        stream = True if value["stream"] is None else bool(value["stream"])
        sampling = Sampling(
            max_new_tokens=self.max_new_tokens if value["max_new_tokens"] is None else int(value["max_new_tokens"]),
            temperature=0.0 if value["temperature"] is None else float(value["temperature"]),
            top_p=1.0 if value["top_p"] is None else float(value["top_p"]),
            seed=None if value["seed"] is None else int(value["seed"]),
            stop_ids=self.pipeline.lm.eos_ids,
        )
        return sampling, stream

    def serve(self, request: Any) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            image = decode_request_image(
                read_bytes(pb.get_input_tensor_by_name(request, "image")), self.max_pixels, self.pipeline.processor
            )
            prompt = read_text(pb.get_input_tensor_by_name(request, "prompt"), self.text_type)
            sampling, stream = self.sampling(request)

            def on_text(piece: str) -> None:
                if getattr(request, "is_cancelled", lambda: False)():
                    raise Cancelled
                if stream:
                    sender.send(pb.InferenceResponse(output_tensors=[text_tensor(pb, "text", piece, self.text_type)]))

            text = self.pipeline.generate(image, prompt, sampling, on_text=on_text)
            if stream:
                sender.send(flags=final)
            else:
                sender.send(pb.InferenceResponse(output_tensors=[text_tensor(pb, "text", text, self.text_type)]), final)
        except Cancelled:
            sender.send(flags=final)
        except (CCRAExportError, ValueError) as exc:  # the request's fault, or a vision model's answer: one line
            sender.send(pb.InferenceResponse(error=pb.TritonError(client_message(exc))), final)
        except Exception as exc:
            LOG.exception("ccra_vlm: generation failed")
            sender.send(
                pb.InferenceResponse(error=pb.TritonError(f"ccra_vlm: internal error ({type(exc).__name__})")), final
            )
