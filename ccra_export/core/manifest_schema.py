"""The bundle model: the manifest's schema (format version 3), shared by its writers and readers.

One set of typed records describes ``manifest.json``. The build, `ccra-export engine` and the
language-model export construct these records; ``core.manifest.write_manifest`` validates them
with the adapter below before anything is written, so a writer bug fails the build and never
reaches a user's reader; ``read_manifest`` validates with the same adapter when a bundle opens.

A bundle is a trust boundary: it may come from another machine, a download or an attacker. Every
field the toolkit reads is typed here, every number is finite and in range, and every file it
names is a normalised relative path listed in ``files``, so code downstream indexes the manifest
without KeyError and never follows it out of the bundle directory. Unknown extra keys are kept
(newer minor writers may add some); missing or mistyped known keys are refused in one line.

Format 3: the vision graphs are always a list, ``graph.parts``: one part named ``vision`` for a
single graph, ``vision_tower`` then ``ccra_head`` when split; ``engine.parts`` and
``calibration.parts`` follow the same list, so no reader branches on the layout. Format 2 (single
and split bundles shaped differently) is still read: ``migrate_v2`` moves its keys into the
format 3 shape in memory; its values, and so its file hashes, are unchanged.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

FORMAT = "ccra-export-bundle"
#: 2: files carry sizes, the manifest has a schema; 3: graphs, engines and calibration are part lists
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)

_OPEN = ConfigDict(extra="allow", strict=True)

PositiveInt = Annotated[int, Field(gt=0, le=2**31 - 1)]
NonNegativeInt = Annotated[int, Field(ge=0, le=2**63 - 1)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

#: a bundle's vision graph(s), in execution order: one graph, or CLIP's tower then CCRA's head
PartName = Literal["vision", "vision_tower", "ccra_head"]
LAYOUTS: tuple[tuple[str, ...], ...] = (("vision",), ("vision_tower", "ccra_head"))


def relative_bundle_path(name: str) -> str:
    """A path inside the bundle as the manifest writes it: relative, POSIX, already normalised."""
    if not name or "\\" in name or "\0" in name:
        raise ValueError("expected a relative path inside the bundle")
    if name.startswith("/") or posixpath.normpath(name) != name or name.split("/")[0] == "..":
        raise ValueError(f"{name!r} is not a normalised relative path inside the bundle")
    return name


RelPath = Annotated[str, AfterValidator(relative_bundle_path)]
NonEmpty = Field(min_length=1)
OneOrTwo = Field(min_length=1, max_length=2)  # one part per graph: LAYOUTS


@with_config(_OPEN)
class TensorSpec(TypedDict):
    """One graph input/output: symbolic dimensions are strings (``batch``, ``text_len``)."""

    name: str
    dtype: str
    shape: list[Annotated[int, Field(ge=0)] | str]


@with_config(_OPEN)
class AxisRange(TypedDict):
    min: PositiveInt
    opt: PositiveInt
    max: PositiveInt


@with_config(_OPEN)
class FileEntry(TypedDict):
    sha256: Sha256
    bytes: NonNegativeInt


@with_config(_OPEN)
class GraphInterface(TypedDict):
    """What one exported ONNX graph exposes (``export.graph_checks.graph_interface``)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: dict[str, int]
    ir_version: int


@with_config(_OPEN)
class GraphPartRecord(TypedDict):
    """One ONNX graph of the bundle: its file, external data and interface."""

    name: PartName
    file: RelPath
    external_data: list[RelPath]
    inputs: Annotated[list[TensorSpec], NonEmpty]
    outputs: Annotated[list[TensorSpec], NonEmpty]


@with_config(_OPEN)
class GraphRecord(TypedDict):
    """The vision stage: its inputs and outputs as a whole, and its graphs (``LAYOUTS``)."""

    inputs: Annotated[list[TensorSpec], NonEmpty]
    outputs: Annotated[list[TensorSpec], NonEmpty]
    parts: Annotated[list[GraphPartRecord], OneOrTwo]


@with_config(_OPEN)
class ThresholdsRecord(TypedDict):
    min_cosine: Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]
    max_scaled_abs_err: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None
    allow_nonfinite: bool
    min_token_cosine: NotRequired[Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)] | None]
    max_token_rel_err: NotRequired[Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None]


@with_config(_OPEN)
class ParityRecord(TypedDict):
    file: RelPath
    passed: bool
    thresholds: ThresholdsRecord


@with_config(_OPEN)
class ParityInputs(TypedDict, total=False):
    """What the parity inputs were: seeded random tensors, or held-out images (INT8)."""

    kind: str
    batch: NonNegativeInt
    seed: NonNegativeInt | None
    text_len: NonNegativeInt | None
    text_embeds: str
    images: list[str]
    recorded_samples: NonNegativeInt  # `check --reference recorded`: how many the bundle holds


@with_config(_OPEN)
class ReferenceRecord(TypedDict):
    file: RelPath
    samples: PositiveInt
    inputs: ParityInputs


#: a plug-in CCRA module, ``package.module:Factory`` (recorded, never imported on the manifest's word)
ModulePath = Annotated[str, Field(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")]


@with_config(_OPEN)
class CheckpointSource(TypedDict):
    kind: Literal["checkpoint"]
    path: str
    weights_sha256: Sha256
    name: NotRequired[str]  # "demo": the shipped checkpoint, found again without --model
    ccra_module: NotRequired[ModulePath]


@with_config(_OPEN)
class PresetSource(TypedDict):
    kind: Literal["preset"]
    preset: str
    seed: NonNegativeInt
    plain: bool
    ccra_module: NotRequired[ModulePath]


SourceRecord = Annotated[CheckpointSource | PresetSource, Field(discriminator="kind")]


@with_config(_OPEN)
class VisionRecord(TypedDict):
    image_size: PositiveInt
    patch_size: PositiveInt
    hidden_size: PositiveInt
    num_layers: PositiveInt


@with_config(_OPEN)
class CCRARecord(TypedDict):
    feature_layers: Annotated[list[NonNegativeInt], NonEmpty]


@with_config(_OPEN)
class ModelRecord(TypedDict):
    name: str
    vision: VisionRecord
    lm_hidden_size: PositiveInt
    ccra: CCRARecord | None


@with_config(_OPEN)
class ExportRecord(TypedDict):
    exporter: str
    opset: dict[str, int]
    ir_version: int
    ccra_fp32_in_fp16: bool | None  # FP16 builds: the CCRA module kept FP32
    lpwca: Literal["portable", "fused", "none"]
    split_vision: bool
    ccra_module: NotRequired[str | None]  # format 2 bundles built before plug-in modules lack it


@with_config(_OPEN)
class BackendRecord(TypedDict):
    name: str
    description: str


@with_config(_OPEN)
class LibraryRecord(TypedDict):
    """A native library outside the bundle, by name and hash (recorded, never loaded from here)."""

    file: str
    sha256: Sha256


@with_config(_OPEN)
class PluginRecord(TypedDict):
    """A fused graph: what TensorRT's parser needs to find for the ccra::LPWCA node."""

    node: str
    plugin_name: str
    plugin_version: str
    plugin_namespace: str
    cpu_kernel_library: LibraryRecord
    tensorrt_plugin_library: LibraryRecord | None


ProfileShapes = Annotated[list[list[NonNegativeInt]], Field(min_length=3, max_length=3)]  # min, opt, max


@with_config(_OPEN)
class EngineTarget(TypedDict):
    """What every engine of one build shares: the TensorRT, the GPU and the plugin it was built with."""

    tensorrt_version: str
    gpu: str
    compute_capability: str
    plugin_sha256: Sha256 | None


@with_config(_OPEN)
class EngineSettings(TypedDict):
    """One engine's own file, typing and optimization profile."""

    file: RelPath
    strongly_typed: bool
    builder_flags: list[str]
    profile: dict[str, ProfileShapes]
    workspace_mib: PositiveInt
    optimization_level: Annotated[int, Field(ge=0, le=5)]


@with_config(_OPEN)
class EngineBuild(EngineTarget, EngineSettings):
    """One engine as built (``engine.plan.engine_record``), and as ``engine_records`` gives it back."""


@with_config(_OPEN)
class EnginePartRecord(EngineSettings):
    part: PartName


@with_config(_OPEN)
class EngineParity(TypedDict):
    file: RelPath
    passed: bool
    reference: str


@with_config(_OPEN)
class EngineRecord(EngineTarget):
    """The bundle's TensorRT engines: one per graph part, in the same order."""

    parts: Annotated[list[EnginePartRecord], OneOrTwo]
    parity: NotRequired[EngineParity]  # `ccra-export engine`: the engine checked against PyTorch


@with_config(_OPEN)
class HeldOutImage(TypedDict):
    file: str
    prompt: str


@with_config(_OPEN)
class SkippedImage(TypedDict):
    file: str
    reason: str


@with_config(_OPEN)
class ImageProcessorRecord(TypedDict):
    shortest_edge: PositiveInt
    crop_height: PositiveInt
    crop_width: PositiveInt
    image_mean: Annotated[list[FiniteFloat], Field(min_length=3, max_length=3)]
    image_std: Annotated[list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]], Field(min_length=3, max_length=3)]
    rescale_factor: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    resample: int
    pad_to_square: bool


@with_config(_OPEN)
class QuantizedGraph(TypedDict):
    """One INT8 graph's own counts and ONNX Runtime range cache."""

    quantized_nodes: NonNegativeInt
    excluded_nodes: NonNegativeInt
    ort_cache: RelPath


@with_config(_OPEN)
class CalibrationPartRecord(QuantizedGraph):
    part: PartName


@with_config(_OPEN)
class CalibrationSettings(TypedDict):
    """What every graph of an INT8 build was calibrated with."""

    method: str
    quantize_ccra: bool
    per_channel: bool
    quantized_op_types: list[str]
    format: str
    calibration_dir: str
    images_used: list[str]
    held_out: list[HeldOutImage]
    skipped: list[SkippedImage]
    prompts: str
    batch_size: PositiveInt
    processor: ImageProcessorRecord
    text_embeddings: str | None


@with_config(_OPEN)
class CalibrationRecord(CalibrationSettings):
    parts: Annotated[list[CalibrationPartRecord], OneOrTwo]


@with_config(_OPEN)
class LogitsFigures(TypedDict):
    cosine: FiniteFloat
    max_abs_err: FiniteFloat


@with_config(_OPEN)
class LanguageModelParity(TypedDict):
    ran_on: Literal["cpu", "cuda"]
    first_token_logits: LogitsFigures
    tokens: list[NonNegativeInt]


@with_config(_OPEN)
class LMQuantRecord(TypedDict):
    """INT4/INT8 decoders: the model builder's weight-only recipe (export/lm_export.LMQuant)."""

    recipe: Literal["default", "rtn", "k_quant", "k_quant_mixed"]
    block_size: Literal[16, 32, 64, 128, 256]
    accuracy_level: Literal[1, 2, 3, 4] | None


@with_config(_OPEN)
class EvaluationRecord(TypedDict):
    """The bundle's own evaluation set and PyTorch FP32's answers to it, recorded at build, so
    `ccra-export eval` compares without PyTorch (a Jetson)."""

    data: RelPath  #: JSON Lines: image, question, answer
    reference: RelPath  #: .npz: per item the answer tokens, their log-probabilities, the prompt
    items: PositiveInt
    max_new_tokens: NotRequired[PositiveInt]  #: the answers' budget (16 where absent)


@with_config(_OPEN)
class DecoderRecord(TypedDict):
    """How the decoder was built besides its weights (export/lm_export.DecoderOptions)."""

    context_length: PositiveInt  #: the tokens of KV the runtime allocates (genai_config's context_length)
    model_context: PositiveInt  #: the model's own (max_position_embeddings)
    prune_lm_head: bool  #: its logits are the last fed position's only (the runtime steps to get others)
    kv_cache: Literal["fp", "int8"]
    kv_bytes_per_token: PositiveInt  #: keys and values of every layer, one sequence
    kv_scheme: NotRequired[Literal["int8_per_channel", "int8_per_tensor"]]
    kv_scales: NotRequired[RelPath]  #: INT8: the calibrated scales the builder read (provenance)
    #: INT8: teacher-forced figures against the same decoder with an unquantized cache
    kv_figures: NotRequired[dict[str, Annotated[float, Field(allow_inf_nan=False)] | int | None]]


@with_config(_OPEN)
class LanguageModelRecord(TypedDict):
    precision: Literal["int4", "int8", "fp16", "fp32"]
    device: Literal["cpu", "cuda"]
    image_token_id: NonNegativeInt
    template: str
    files: Annotated[list[RelPath], NonEmpty]
    parity: LanguageModelParity
    #: INT4/INT8: the recipe (bundles built before it used the builder's default, block 32)
    quant: NotRequired[LMQuantRecord]
    evaluation: NotRequired[EvaluationRecord]  #: bundles built before it have none
    #: bundles built before it: the model's context, every position's logits, an unquantized cache
    decoder: NotRequired[DecoderRecord]


@with_config(_OPEN)
class Manifest(TypedDict):
    format: str
    format_version: int
    tool_version: str
    model: ModelRecord
    variant: Literal["ccra", "plain"]
    source: SourceRecord
    precision: Literal["fp32", "fp16", "int8"]
    export: ExportRecord
    graph: GraphRecord
    dynamic_axes: dict[str, AxisRange]
    files: Annotated[dict[RelPath, FileEntry], NonEmpty]
    backend: BackendRecord
    parity: ParityRecord
    reference: ReferenceRecord | None
    engine: EngineRecord | None
    plugin: PluginRecord | None
    calibration: CalibrationRecord | None
    language_model: LanguageModelRecord | None
    image_processor: ImageProcessorRecord
    created_utc: NotRequired[str]
    host: NotRequired[dict[str, Any]]
    ccra_parameters: NotRequired[NonNegativeInt]


_ADAPTER = TypeAdapter(Manifest)
_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}  # validate_record's, one per record type
_Record = TypeVar("_Record")


def validate_manifest(data: Any, moved: dict[str, str] | None = None) -> Manifest:
    """The manifest, typed; ``ValueError`` with one line naming the first bad key otherwise.
    ``moved``: ``migrate_v2``'s key paths, so the line names the key as the file writes it."""
    try:
        try:
            manifest = _ADAPTER.validate_python(data)
        except ValidationError as exc:
            raise ValueError(first_error(exc)) from None
        _check_files_listed(manifest)
        _check_layout(manifest)
    except ValueError as exc:
        raise ValueError(written_as(str(exc), moved or {})) from None
    return manifest


def validate_record(kind: type[_Record], data: Any, key: str) -> _Record:
    """``data`` as the manifest record ``kind`` at ``key``, in the form a reader parses (a JSON round
    trip: tuples become lists, enums their values); ``ValueError`` naming the key otherwise."""
    if kind not in _ADAPTERS:
        _ADAPTERS[kind] = TypeAdapter(kind)
    try:
        return _ADAPTERS[kind].validate_python(json.loads(json.dumps(data, allow_nan=False)))
    except ValidationError as exc:
        raise ValueError(first_error(exc, (key,))) from None


def _describe(names: Sequence[str]) -> str:
    return "one graph" if names == ["vision"] else " and ".join(names)


def _check_layout(manifest: Manifest) -> None:
    """The graphs are one of ``LAYOUTS`` (split only for CCRA); an engine and a calibration record
    cover exactly the bundle's graphs, in their order."""
    graphs = [part["name"] for part in manifest["graph"]["parts"]]
    if tuple(graphs) not in LAYOUTS:
        raise ValueError(f"graph.parts: expected vision (one graph) or vision_tower then ccra_head, got {graphs}")
    if len(graphs) > 1 and manifest["variant"] != "ccra":
        raise ValueError("graph.parts: only a CCRA bundle splits its vision graph (this one is plain)")
    engine, calibration = manifest["engine"], manifest["calibration"]
    covered = {
        "engine": [part["part"] for part in engine["parts"]] if engine else graphs,
        "calibration": [part["part"] for part in calibration["parts"]] if calibration else graphs,
    }
    for key, names in covered.items():
        if names != graphs:
            raise ValueError(f"{key}: built for {_describe(names)}, but the bundle's graphs are {_describe(graphs)}")


_UNION_TAG = re.compile(r"^(\[key\]|constrained-\w+|function-\w+\[.*\]|str|int|float|bool|none)$")


def first_error(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """pydantic's first error as ``key.path: what was expected`` (one line)."""
    error = exc.errors(include_url=False)[0]
    parts = [*prefix]
    for part in error["loc"]:  # ("graph", "inputs", 0) -> graph.inputs[0]; a key -> files['vision.onnx']
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{part}]"]
        elif _UNION_TAG.match(part) or part.endswith("Source"):  # pydantic's names for union members
            continue
        elif not part.isidentifier():
            parts[-1:] = [f"{parts[-1] if parts else ''}[{part!r}]"]
        else:
            parts.append(part)
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{'.'.join(parts) or 'top level'}: {message}"


def named_files(manifest: Manifest) -> list[tuple[str, str]]:
    """``(key, path)`` for every file the manifest points at besides ``files`` itself."""
    named = []
    for i, part in enumerate(manifest["graph"]["parts"]):
        named.append((f"graph.parts[{i}].file", part["file"]))
        named += [(f"graph.parts[{i}].external_data[{j}]", n) for j, n in enumerate(part["external_data"])]
    if manifest["reference"]:
        named.append(("reference.file", manifest["reference"]["file"]))
    if manifest["engine"]:
        named += [(f"engine.parts[{i}].file", p["file"]) for i, p in enumerate(manifest["engine"]["parts"])]
    if manifest["calibration"]:
        calibration = manifest["calibration"]["parts"]
        named += [(f"calibration.parts[{i}].ort_cache", p["ort_cache"]) for i, p in enumerate(calibration)]
    if manifest["language_model"]:
        named += [(f"language_model.files[{i}]", n) for i, n in enumerate(manifest["language_model"]["files"])]
        decoder = manifest["language_model"].get("decoder")
        if decoder and "kv_scales" in decoder:
            named.append(("language_model.decoder.kv_scales", decoder["kv_scales"]))
        evaluation = manifest["language_model"].get("evaluation")
        if evaluation:
            named += [(f"language_model.evaluation.{key}", evaluation[key]) for key in ("data", "reference")]
    return named


def _check_files_listed(manifest: Manifest) -> None:
    """Every file the manifest uses is one it hashes: nothing is read that ``files`` does not cover."""
    for key, name in named_files(manifest):
        if name not in manifest["files"]:
            raise ValueError(f"{key}: {name!r} is not listed in files")


# ---------------------------------------------------------------- format 2

#: format 2's single engine kept these beside its own fields; format 3 keeps them beside its parts
_ENGINE_SHARED_KEYS = ("tensorrt_version", "gpu", "compute_capability", "plugin_sha256", "parity")
#: format 2's calibration record held its first graph's counts and cache at the top
_QUANTIZED_GRAPH_KEYS = ("quantized_nodes", "excluded_nodes", "ort_cache")


def migrate_v2(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A format 2 manifest (as ccra-export wrote it before format 3) in format 3's shape, and the key
    paths that moved (format 3's -> as written), so an error still names the key in the file.

    Only keys move; every value is kept, so the bundle's file hashes and sizes still verify (and
    ``manifest.json`` is not itself hashed). A malformed format 2 manifest is reshaped as far as it
    goes and then refused by ``validate_manifest``, naming the key as written.
    """
    data = dict(data)
    moved: dict[str, str] = {}
    graph = data.get("graph")
    split = isinstance(graph, dict) and "parts" in graph
    if isinstance(graph, dict) and not split:  # format 2's one graph: its file beside the interface
        part = {"name": "vision", **{k: v for k, v in graph.items() if k != "parts"}}
        data["graph"] = {**{k: graph[k] for k in ("inputs", "outputs") if k in graph}, "parts": [part]}
        moved["graph.parts[0]"] = "graph"
    engine = data.get("engine")
    if isinstance(engine, dict) and "parts" not in engine:  # one engine, all its fields at the top
        own = {k: v for k, v in engine.items() if k not in _ENGINE_SHARED_KEYS}
        data["engine"] = {
            **{k: engine[k] for k in _ENGINE_SHARED_KEYS if k in engine},
            "parts": [{"part": "vision", **own}],
        }
        moved["engine.parts[0]"] = "engine"
    calibration = data.get("calibration")
    if isinstance(calibration, dict) and "parts" not in calibration:
        shared = {k: v for k, v in calibration.items() if k not in (*_QUANTIZED_GRAPH_KEYS, "graph", "graphs")}
        first = {k: calibration[k] for k in _QUANTIZED_GRAPH_KEYS if k in calibration}
        parts = [{"part": calibration.get("graph", "vision"), **first}]
        moved["calibration.parts[0]"] = "calibration"
        others = calibration.get("graphs", {})
        if isinstance(others, dict):  # a split bundle's head: graphs.ccra_head
            for name, record in others.items():
                moved[f"calibration.parts[{len(parts)}]"] = f"calibration.graphs.{name}"
                parts.append({"part": name, **record} if isinstance(record, dict) else record)
        data["calibration"] = {**shared, "parts": parts}
    export = data.get("export")
    if isinstance(export, dict) and "split_vision" not in export:  # format 2 before split bundles
        data["export"] = {**export, "split_vision": split}
    data["format_version"] = FORMAT_VERSION
    return data, moved


def written_as(message: str, moved: dict[str, str]) -> str:
    """``message`` (``key.path: ...``) with a moved key path as the format 2 file writes it."""
    for new in sorted(moved, key=len, reverse=True):
        if message.startswith(new) and message[len(new) : len(new) + 1] in (".", ":", "["):
            return moved[new] + message[len(new) :]
    return message
