"""The bundle manifest's schema (format version 2), checked once when a bundle is opened.

A bundle is a trust boundary: it may come from another machine, a download or an attacker. Every
field the toolkit reads is typed here, every number is finite and in range, and every file it
names is a normalised relative path listed in ``files``, so code downstream indexes the manifest
without KeyError and never follows it out of the bundle directory. Unknown extra keys are kept
(newer minor writers may add some); missing or mistyped known keys are refused in one line.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

_OPEN = ConfigDict(extra="allow", strict=True)

PositiveInt = Annotated[int, Field(gt=0, le=2**31 - 1)]
NonNegativeInt = Annotated[int, Field(ge=0, le=2**63 - 1)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def relative_bundle_path(name: str) -> str:
    """A path inside the bundle as the manifest writes it: relative, POSIX, already normalised."""
    if not name or "\\" in name or "\0" in name:
        raise ValueError("expected a relative path inside the bundle")
    if name.startswith("/") or posixpath.normpath(name) != name or name.split("/")[0] == "..":
        raise ValueError(f"{name!r} is not a normalised relative path inside the bundle")
    return name


RelPath = Annotated[str, AfterValidator(relative_bundle_path)]


@with_config(_OPEN)
class TensorSpec(TypedDict):
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
class GraphPartRecord(TypedDict):
    name: Literal["vision_tower", "ccra_head"]
    file: RelPath
    external_data: list[RelPath]
    inputs: Annotated[list[TensorSpec], Field(min_length=1)]
    outputs: Annotated[list[TensorSpec], Field(min_length=1)]


@with_config(_OPEN)
class _GraphRecord(TypedDict):
    """One graph (``file``), or a split bundle's tower and head (``parts``, in execution order);
    ``inputs``/``outputs`` are the vision stage's as a whole either way."""

    file: NotRequired[RelPath]
    external_data: NotRequired[list[RelPath]]
    parts: NotRequired[Annotated[list[GraphPartRecord], Field(min_length=2, max_length=2)]]
    inputs: Annotated[list[TensorSpec], Field(min_length=1)]
    outputs: Annotated[list[TensorSpec], Field(min_length=1)]


def _one_graph_or_parts(graph: _GraphRecord) -> _GraphRecord:
    if ("parts" in graph) == ("file" in graph):
        raise ValueError("expected either file (one graph) or parts (vision_tower, ccra_head)")
    if "file" in graph and "external_data" not in graph:
        raise ValueError("external_data: field required with file")
    if "parts" in graph and [p["name"] for p in graph["parts"]] != ["vision_tower", "ccra_head"]:
        raise ValueError("parts: expected vision_tower then ccra_head")
    return graph


GraphRecord = Annotated[_GraphRecord, AfterValidator(_one_graph_or_parts)]


@with_config(_OPEN)
class ThresholdsRecord(TypedDict):
    min_cosine: Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]
    max_scaled_abs_err: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None
    allow_nonfinite: bool


@with_config(_OPEN)
class ParityRecord(TypedDict):
    file: RelPath
    passed: bool
    thresholds: ThresholdsRecord


@with_config(_OPEN)
class ReferenceRecord(TypedDict):
    file: RelPath
    samples: PositiveInt
    inputs: dict[str, Any]


#: a plug-in CCRA module, ``package.module:Factory`` (recorded, never imported on the manifest's word)
ModulePath = Annotated[str, Field(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")]


@with_config(_OPEN)
class CheckpointSource(TypedDict):
    kind: Literal["checkpoint"]
    path: str
    weights_sha256: Sha256
    ccra_module: NotRequired[ModulePath]


@with_config(_OPEN)
class PresetSource(TypedDict):
    kind: Literal["preset"]
    preset: str
    seed: NonNegativeInt
    plain: bool
    ccra_module: NotRequired[ModulePath]


@with_config(_OPEN)
class VisionRecord(TypedDict):
    image_size: PositiveInt
    patch_size: PositiveInt
    hidden_size: PositiveInt
    num_layers: PositiveInt


@with_config(_OPEN)
class CCRARecord(TypedDict):
    feature_layers: Annotated[list[NonNegativeInt], Field(min_length=1)]


@with_config(_OPEN)
class ModelRecord(TypedDict):
    name: str
    vision: VisionRecord
    lm_hidden_size: PositiveInt
    ccra: CCRARecord | None


@with_config(_OPEN)
class EnginePartRecord(TypedDict):
    part: Literal["vision_tower", "ccra_head"]
    file: RelPath


@with_config(_OPEN)
class _EngineRecord(TypedDict):
    file: NotRequired[RelPath]
    parts: NotRequired[Annotated[list[EnginePartRecord], Field(min_length=2, max_length=2)]]
    tensorrt_version: str
    compute_capability: str


def _one_engine_or_parts(engine: _EngineRecord) -> _EngineRecord:
    if ("parts" in engine) == ("file" in engine):
        raise ValueError("expected either file (one engine) or parts (vision_tower, ccra_head)")
    return engine


EngineRecord = Annotated[_EngineRecord, AfterValidator(_one_engine_or_parts)]


@with_config(_OPEN)
class HeldOutImage(TypedDict):
    file: str
    prompt: str


@with_config(_OPEN)
class CalibrationGraphRecord(TypedDict):
    ort_cache: RelPath


@with_config(_OPEN)
class CalibrationRecord(TypedDict):
    calibration_dir: str
    held_out: list[HeldOutImage]
    processor: dict[str, Any]
    ort_cache: RelPath
    graphs: NotRequired[dict[Literal["ccra_head"], CalibrationGraphRecord]]  # a split bundle's head


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
class LanguageModelRecord(TypedDict):
    precision: Literal["int4", "int8", "fp16", "fp32"]
    device: Literal["cpu", "cuda"]
    image_token_id: NonNegativeInt
    template: str
    files: Annotated[list[RelPath], Field(min_length=1)]
    parity: LanguageModelParity


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
class Manifest(TypedDict):
    format: str
    format_version: int
    tool_version: str
    model: ModelRecord
    variant: Literal["ccra", "plain"]
    source: Annotated[CheckpointSource | PresetSource, Field(discriminator="kind")]
    precision: Literal["fp32", "fp16", "int8"]
    export: dict[str, Any]
    graph: GraphRecord
    dynamic_axes: dict[str, AxisRange]
    files: Annotated[dict[RelPath, FileEntry], Field(min_length=1)]
    backend: dict[str, Any]
    parity: ParityRecord
    reference: ReferenceRecord | None
    engine: EngineRecord | None
    plugin: dict[str, Any] | None
    calibration: CalibrationRecord | None
    language_model: LanguageModelRecord | None
    image_processor: ImageProcessorRecord
    created_utc: NotRequired[str]
    host: NotRequired[dict[str, Any]]
    ccra_parameters: NotRequired[NonNegativeInt]


_ADAPTER = TypeAdapter(Manifest)


def validate_manifest(data: Any) -> Manifest:
    """The manifest, typed; ``ValueError`` with one line naming the first bad key otherwise."""
    try:
        manifest = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ValueError(first_error(exc)) from None
    _check_files_listed(manifest)
    _check_layout(manifest)
    return manifest


def _check_layout(manifest: Manifest) -> None:
    """A split graph only for CCRA, and an engine for exactly the bundle's graphs, in their order."""
    graph, engine = manifest["graph"], manifest["engine"]
    graphs = [part["name"] for part in graph.get("parts", [])]
    if graphs and manifest["variant"] != "ccra":
        raise ValueError("graph.parts: only a CCRA bundle splits its vision graph (this one is plain)")
    if engine:
        engines = [part["part"] for part in engine.get("parts", [])]
        if engines != graphs:
            raise ValueError(
                f"engine: built for {engines or 'one graph'}, but the bundle's graphs are {graphs or 'one graph'}"
            )


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
    graph = manifest["graph"]
    named = []
    for key, record in (
        [("graph", graph)] if "file" in graph else [(f"graph.parts[{i}]", p) for i, p in enumerate(graph["parts"])]
    ):
        named.append((f"{key}.file", record["file"]))
        named += [(f"{key}.external_data[{i}]", n) for i, n in enumerate(record["external_data"])]
    if manifest["reference"]:
        named.append(("reference.file", manifest["reference"]["file"]))
    engine = manifest["engine"]
    if engine:
        records = (
            [("engine", engine)]
            if "file" in engine
            else [(f"engine.parts[{i}]", p) for i, p in enumerate(engine["parts"])]
        )
        named += [(f"{key}.file", record["file"]) for key, record in records]
    if manifest["calibration"]:
        named.append(("calibration.ort_cache", manifest["calibration"]["ort_cache"]))
        for name, record in manifest["calibration"].get("graphs", {}).items():
            named.append((f"calibration.graphs.{name}.ort_cache", record["ort_cache"]))
    if manifest["language_model"]:
        named += [(f"language_model.files[{i}]", n) for i, n in enumerate(manifest["language_model"]["files"])]
    return named


def _check_files_listed(manifest: Manifest) -> None:
    """Every file the manifest uses is one it hashes: nothing is read that ``files`` does not cover."""
    for key, name in named_files(manifest):
        if name not in manifest["files"]:
            raise ValueError(f"{key}: {name!r} is not listed in files")
