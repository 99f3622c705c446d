"""Triton ``config.pbtxt`` for the two models of the repository, built as Triton's own protobuf.

Every config is a ``ModelConfig`` message (``tritonclient.grpc.model_config_pb2``, the schema
Triton parses) written with protobuf's text format, so a field Triton does not know fails here,
not at server start. Shapes and types come from the bundle manifest; batching from its
optimization profile (the engine's own profile when TensorRT runs the graph).

- ``ccra_vision``: the vision graph. ``tensorrt_plan`` (the engine), ``onnxruntime_onnx`` (the
  ONNX graph) or ``python`` (ONNX Runtime inside Triton's Python backend), batched by Triton's
  dynamic batcher. A split bundle (``build --split-vision``) has two graphs instead, each its own
  model configured the same way from its own part record: ``ccra_vision_tower`` (the CLIP tower)
  and ``ccra_head`` (CCRA's head).
- ``ccra_vlm``: a decoupled Python-backend model: image + prompt in, text out as it is generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ccra_export.core.errors import BundleError, ConfigError
from ccra_export.core.extras import missing_error, require
from ccra_export.core.manifest_schema import GraphPartRecord, GraphRecord, Manifest
from ccra_export.core.vision_graphs import HEAD, TOWER, WHOLE_CCRA, engine_records, part_records

VISION_MODEL = "ccra_vision"
TOWER_MODEL = "ccra_vision_tower"
HEAD_MODEL = "ccra_head"
VLM_MODEL = "ccra_vlm"
#: the Triton model that serves each graph of a bundle (core.vision_graphs' part names)
PART_MODELS = {WHOLE_CCRA.name: VISION_MODEL, TOWER.name: TOWER_MODEL, HEAD.name: HEAD_MODEL}
#: ccra_vlm's config parameters naming the vision models it calls through BLS, and its tower cache
VISION_MODEL_PARAMETER = "vision_model"
TOWER_MODEL_PARAMETER = "tower_model"
HEAD_MODEL_PARAMETER = "head_model"
TOWER_CACHE_PARAMETER = "tower_cache_mib"
#: Triton platform/backend of ccra_vision for each --vision-backend
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}
PYTHON_BACKEND = "python"
#: how ccra_vlm's prompt and text travel: Triton's string type, or UTF-8 bytes in a UINT8 vector
TEXT_TYPES = ("string", "uint8")
#: ccra_vlm's optional inputs (a request leaves them out: greedy, the default length, streamed): name -> type
SAMPLING_INPUTS = {
    "max_new_tokens": "TYPE_INT32",
    "temperature": "TYPE_FP32",
    "top_p": "TYPE_FP32",
    "seed": "TYPE_UINT64",
    "stream": "TYPE_BOOL",
}
_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
BATCH_AXIS = "batch"


def model_config_pb2() -> ModuleType:
    """Triton's ModelConfig protobuf module, from tritonclient (the ``[triton]`` extra)."""
    require("triton", "ccra-export triton")
    try:
        from tritonclient.grpc import model_config_pb2 as pb2
    except ImportError as exc:  # installed, but broken (a mismatched grpcio or protobuf)
        raise missing_error("triton", "ccra-export triton", f"tritonclient.grpc does not import: {exc}") from None
    return pb2


def to_pbtxt(config: Any) -> str:
    """A ModelConfig message as Triton's config.pbtxt text."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> Any:
    """config.pbtxt text -> ModelConfig, as Triton reads it (unknown fields are an error)."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())


@dataclass(frozen=True)
class Batching:
    """Triton's batching of a vision model, from the optimization profile's batch axis.

    ``preferred`` leaves out 1: a preferred size of 1 makes the dynamic batcher send every request
    alone the moment it arrives, which is no batching at all."""

    max_batch_size: int
    preferred: tuple[int, ...]
    max_queue_delay_us: int


def part_manifest(manifest: Manifest, part: GraphPartRecord) -> Manifest:
    """The manifest as if ``part`` (a ``part_records`` entry) were the bundle's only graph, with
    that part's engine alone: what configures the part's model. For a single-graph bundle it is
    the manifest itself."""
    graph = GraphRecord(inputs=part["inputs"], outputs=part["outputs"], parts=[part])
    engine = manifest["engine"]
    if engine:
        engine = {**engine, "parts": [record for record in engine["parts"] if record["part"] == part["name"]]}
    return {**manifest, "graph": graph, "engine": engine}


def part_manifests(manifest: Manifest) -> list[tuple[str, Manifest]]:
    """(Triton model name, ``part_manifest``) for each graph of the bundle, in execution order."""
    return [(PART_MODELS[part["name"]], part_manifest(manifest, part)) for part in part_records(manifest)]


def batch_range(manifest: Manifest) -> tuple[int, int, int]:
    """(min, opt, max) of the batch axis: the engine's profile when the bundle has one (its build
    may have overridden the manifest's axes), else the manifest's ``dynamic_axes``."""
    first = manifest["graph"]["inputs"][0]
    engines = engine_records(manifest).values()
    profile = next((e["profile"][first["name"]] for e in engines if first["name"] in e["profile"]), None)
    if profile and first["shape"] and first["shape"][0] == BATCH_AXIS:
        low, opt, high = (int(shape[0]) for shape in profile)
        return low, opt, high
    axis = manifest["dynamic_axes"].get(BATCH_AXIS)
    if axis is None:
        return 1, 1, 1
    return axis["min"], axis["opt"], axis["max"]


def batching(manifest: Manifest, max_queue_delay_us: int, *, use_engine: bool) -> Batching:
    """The dynamic-batching policy of ccra_vision for this bundle (of one graph's model, given its
    ``part_manifest``)."""
    view: Manifest = manifest if use_engine else {**manifest, "engine": None}
    _, opt, high = batch_range(view)
    preferred = tuple(sorted({opt, high} - {1}))
    return Batching(high, preferred, max_queue_delay_us)


def batched_graph(manifest: Manifest) -> bool:
    """Every vision input and output has the symbolic batch axis first (Triton's batch dimension)."""
    graph = manifest["graph"]
    return all(spec["shape"] and spec["shape"][0] == BATCH_AXIS for spec in [*graph["inputs"], *graph["outputs"]])


def triton_type(dtype: str, where: str) -> str:
    try:
        return _TRITON_TYPES[dtype]
    except KeyError:
        raise BundleError(
            f"{where}: dtype {dtype!r} has no Triton type (expected one of {sorted(_TRITON_TYPES)})"
        ) from None


def triton_dims(shape: list[int | str], batched: bool) -> list[int]:
    """Manifest shape -> Triton dims: the batch axis dropped when Triton batches, other symbolic axes -1."""
    dims = shape[1:] if batched else shape
    return [d if isinstance(d, int) else -1 for d in dims]


def _add_tensors(config: Any, pb2: ModuleType, manifest: Manifest, batched: bool) -> None:
    graph = manifest["graph"]
    for kind, target, specs in (
        ("inputs", config.input, graph["inputs"]),
        ("outputs", config.output, graph["outputs"]),
    ):
        for spec in specs:
            target.add(
                name=spec["name"],
                data_type=pb2.DataType.Value(triton_type(spec["dtype"], f"graph.{kind} {spec['name']}")),
                dims=triton_dims(spec["shape"], batched),
            )


def vision_config(
    manifest: Manifest,
    platform: str,
    policy: Batching,
    *,
    gpu: bool,
    instances: int = 1,
    parameters: dict[str, str] | None = None,
    name: str = VISION_MODEL,
) -> Any:
    """``ccra_vision``'s ModelConfig (or, with a ``part_manifest`` and that part's ``name``, the
    config of one graph of a split bundle). ``platform``: ``tensorrt_plan``, ``onnxruntime_onnx``
    or ``python`` (then ``backend: "python"``); ``gpu`` picks a GPU or CPU instance group."""
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(name=name)
    if platform == PYTHON_BACKEND:
        config.backend = PYTHON_BACKEND
    else:
        config.platform = platform
        config.default_model_filename = "model.plan" if platform == "tensorrt_plan" else "model.onnx"
    batched = batched_graph(manifest) and policy.max_batch_size > 0
    config.max_batch_size = policy.max_batch_size if batched else 0
    _add_tensors(config, pb2, manifest, batched)
    if batched:
        config.dynamic_batching.preferred_batch_size.extend(policy.preferred)
        config.dynamic_batching.max_queue_delay_microseconds = policy.max_queue_delay_us
    kind = pb2.ModelInstanceGroup.KIND_GPU if gpu else pb2.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=instances)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


def vlm_config(text_type: str, *, instances: int = 1, parameters: dict[str, str] | None = None) -> Any:
    """``ccra_vlm``'s ModelConfig: decoupled (one response per text piece), Python backend.

    ``image`` is the encoded file (PNG, JPEG, ...) as a UINT8 vector; ``prompt`` and ``text`` are
    Triton strings, or UTF-8 in UINT8 vectors with ``text_type="uint8"``; sampling parameters are
    optional inputs (absent: greedy, the model's default length, streamed)."""
    if text_type not in TEXT_TYPES:
        raise ConfigError(f"expected one of {', '.join(TEXT_TYPES)}", field="text_type", value=text_type)
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(name=VLM_MODEL, backend=PYTHON_BACKEND, max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    text = (pb2.TYPE_STRING, [1]) if text_type == "string" else (pb2.TYPE_UINT8, [-1])
    config.input.add(name="image", data_type=pb2.TYPE_UINT8, dims=[-1])
    config.input.add(name="prompt", data_type=text[0], dims=text[1])
    for name, kind in SAMPLING_INPUTS.items():
        config.input.add(name=name, data_type=pb2.DataType.Value(kind), dims=[1], optional=True)
    config.output.add(name="text", data_type=text[0], dims=text[1])
    config.instance_group.add(kind=pb2.ModelInstanceGroup.KIND_CPU, count=instances)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config
