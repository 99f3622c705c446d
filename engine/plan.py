"""Everything about a TensorRT engine build that needs no TensorRT: decided here, tested on CPU.

- ``precision_plan``: TensorRT 11 removed weak typing (``BuilderFlag.FP16/INT8``) and implicit INT8;
  there the network is strongly typed and the ONNX graph's types decide. TensorRT 10 (JetPack 6)
  still builds weakly typed networks with precision flags, and also offers strong typing.
- ``optimization_profiles``: min/opt/max shapes per input from the bundle's symbolic axes.
- ``engine_record``: what an engine was built for (the manifest's ``engine`` entry); the runtime
  refuses a mismatch when it loads one (``ccra_export.runtime.engine_compat``).
The thin layer that calls TensorRT (build.py) only translates these into API calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from ccra_export.core import lpwca_schema
from ccra_export.core.errors import ConfigError
from ccra_export.core.graph_scopes import CCRA_SCOPE, in_scope
from ccra_export.core.lpwca_schema import is_lpwca
from ccra_export.core.manifest_schema import AxisRange, EngineBuild, GraphPartRecord, Manifest, TensorSpec

TYPING_CHOICES = ("auto", "strong", "weak")


@dataclass(frozen=True)
class TrtVersion:
    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> TrtVersion:
        try:
            parts = [int(p) for p in text.split(".")[:3]]
        except ValueError:
            raise ConfigError(f"TensorRT version {text!r}: expected MAJOR.MINOR.PATCH") from None
        return cls(*[*parts, 0, 0][:3])

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class PrecisionPlan:
    """How to ask TensorRT for the bundle's precision: network creation flags and builder flags.

    ``cleared_flags``: flags TensorRT sets by default that the plan turns off. TF32 is on by
    default and rounds FP32 matmul inputs to 10 mantissa bits, far outside the FP32 parity bound
    (1e-4 relative): FP32 engines clear it.
    """

    strongly_typed: bool
    builder_flags: tuple[str, ...]
    why: str
    cleared_flags: tuple[str, ...] = ()
    pin_fp32: bool = False  # weak typing: the graph's FP32 islands get layer precision FP32


def precision_plan(version: TrtVersion, precision: str, typing: str = "auto") -> PrecisionPlan:
    """Typing and flags for an engine of the bundle's ``precision`` on TensorRT ``version``.

    Our FP16 and INT8 graphs carry FP32 islands on purpose (Softmax and the CCRA module: LPWCA
    scales features by up to L*N = 13,248; the INT8 graph's float layers). A weakly typed network
    with the FP16 flag lets TensorRT run those in FP16 anyway, so ``auto`` is strongly typed on
    TensorRT 10 too. ``weak`` (TensorRT 10 only) keeps the flags for speed and pins the islands
    (``pin_fp32``: layer precision FP32 and OBEY_PRECISION_CONSTRAINTS).
    """
    if typing not in TYPING_CHOICES:
        raise ConfigError(f"expected one of {', '.join(TYPING_CHOICES)}", field="trt_typing", value=typing)
    if version.major < 10:
        raise ConfigError(f"TensorRT {version}: IPluginV3 and this builder need TensorRT >= 10 (JetPack 6)")
    cleared = ("TF32",) if precision == "fp32" else ()
    if version.major >= 11:
        if typing == "weak":
            raise ConfigError(
                f"TensorRT {version} removed weak typing; the graph's types decide", field="trt_typing", value="weak"
            )
        why = f"TensorRT {version}: strongly typed, precision from the {precision} graph"
        return PrecisionPlan(True, (), why, cleared)
    if typing in ("auto", "strong"):
        reason = "on request" if typing == "strong" else "(the graph's FP32 islands stay FP32)"
        why = f"TensorRT {version}: strongly typed {reason}; ONNX types are kept exactly"
        return PrecisionPlan(True, (), why, cleared)
    flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]
    pin = precision != "fp32"
    if pin:
        flags = (*flags, "OBEY_PRECISION_CONSTRAINTS")
    why = f"TensorRT {version}: weakly typed on request with {'+'.join(flags) or 'no'} flags"
    if pin:
        why += "; the graph's FP32 islands pinned to FP32"
    return PrecisionPlan(False, flags, why, cleared, pin)


FLOAT_ALWAYS_OP_TYPES = ("Softmax", "LayerNormalization")


def fp32_islands(proto: onnx.ModelProto, precision: str) -> tuple[str, ...]:
    """Names of the nodes that must compute in FP32 in a weakly typed engine (TensorRT's ONNX
    parser names each layer after its node, with ``_N`` suffixes for a node's extra layers).

    FP16 graphs: every node whose float output is FP32 (what convert_to_fp16 kept: Softmax, the
    CCRA module, their boundary casts). INT8 graphs: the layers the quantizer kept float on
    purpose (Softmax, LayerNormalization, the CCRA module).
    """
    if precision == "fp32":
        return ()
    if precision == "int8":
        return tuple(
            node.name
            for node in proto.graph.node
            if node.op_type in FLOAT_ALWAYS_OP_TYPES or in_scope(node, CCRA_SCOPE) or is_lpwca(node)
        )
    types = lpwca_schema.tensor_types(proto)
    return tuple(
        node.name for node in proto.graph.node if any(types.get(out) == onnx.TensorProto.FLOAT for out in node.output)
    )


def pinned_layer(layer_name: str, islands: frozenset[str], node_names: frozenset[str] = frozenset()) -> bool:
    """Whether a TensorRT layer comes from one of the ``islands`` nodes: the parser names a node's
    layer after it and any further ones ``name_N`` (onnx-tensorrt ImporterContext::registerLayer).
    A layer named like another node of the graph is that node's."""
    if layer_name in islands or layer_name in node_names:
        return layer_name in islands
    base, _, suffix = layer_name.rpartition("_")
    return suffix.isdigit() and base in islands


@dataclass(frozen=True)
class Profile:
    """Optimization profile: per input, (min, opt, max) shapes."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_TEXT_LEN = 512


def profile_axes(
    *,
    has_text: bool,
    max_batch: int | None = None,
    opt_batch: int | None = None,
    max_text_len: int | None = None,
    opt_text_len: int | None = None,
) -> dict[str, AxisRange]:
    """min/opt/max of the graph's symbolic axes from the build flags (recorded in the manifest).

    max defaults to batch 8 and 512 instruction tokens; opt to batch 1 (one camera frame) and 64
    tokens: the shapes TensorRT tunes its tactics for.
    """
    max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    max_text_len = DEFAULT_MAX_TEXT_LEN if max_text_len is None else max_text_len
    batch = {"min": 1, "opt": 1 if opt_batch is None else opt_batch, "max": max_batch}
    axes = {"batch": _checked(batch, "opt_batch", "max_batch")}
    if has_text:
        opt = min(64, max_text_len) if opt_text_len is None else opt_text_len
        text_len = {"min": 1, "opt": opt, "max": max_text_len}
        axes["text_len"] = _checked(text_len, "opt_text_len", "max_text_len")
    return {name: AxisRange(min=b["min"], opt=b["opt"], max=b["max"]) for name, b in axes.items()}


def _checked(bounds: dict[str, int], *inputs: str, where: str = "") -> dict[str, int]:
    """``bounds`` once 1 <= min <= opt <= max; else one line after ``where``, or after ``inputs``
    (the opt and max inputs that gave them, named by each front end)."""
    if not 1 <= bounds["min"] <= bounds["opt"] <= bounds["max"]:
        where = where or "/".join("{" + name + "}" for name in inputs)
        raise ConfigError(f"{where}: need 1 <= min <= opt <= max, got {bounds}", mentions=inputs)
    return bounds


def optimization_profiles(
    graph_inputs: list[TensorSpec],
    dynamic_axes: Mapping[str, AxisRange],
    overrides: dict[str, dict[str, int]] | None = None,
) -> Profile:
    """Resolve every symbolic dimension of every input to its (min, opt, max): the manifest's axes,
    with ``overrides`` (the profile flags of `ccra-export engine`) on top."""
    overrides = overrides or {}
    for name in overrides:
        if name not in dynamic_axes:
            raise ConfigError(f"profile: this graph has no symbolic axis {name!r} (it has {sorted(dynamic_axes)})")
    axes = {
        name: _checked(
            {"min": bounds["min"], "opt": bounds["opt"], "max": bounds["max"], **overrides.get(name, {})},
            where=f"profile for {name!r}",
        )
        for name, bounds in dynamic_axes.items()
    }
    shapes = {}
    for spec in graph_inputs:
        triple = []
        for key in ("min", "opt", "max"):
            dims = []
            for dim in spec["shape"]:
                if isinstance(dim, int):
                    dims.append(dim)
                elif dim in axes:
                    dims.append(axes[dim][key])
                else:
                    raise ConfigError(f"input {spec['name']}: symbolic axis {dim!r} has no min/opt/max in the manifest")
            triple.append(tuple(dims))
        shapes[spec["name"]] = tuple(triple)
    return Profile(shapes)


def engine_record(
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    plugin_sha256: str | None,
    plan: PrecisionPlan,
    profile: Profile,
    settings: dict[str, Any],
) -> EngineBuild:
    """What one engine was built for and with (``settings``: its file, workspace and optimization
    level); ``engine.build.join_engine_records`` puts a build's engines into the manifest."""
    return EngineBuild(
        tensorrt_version=trt_version,
        gpu=gpu_name,
        compute_capability=compute_capability,
        plugin_sha256=plugin_sha256,
        strongly_typed=plan.strongly_typed,
        builder_flags=list(plan.builder_flags),
        profile={name: [list(s) for s in triple] for name, triple in profile.shapes.items()},
        **settings,  # type: ignore[typeddict-item]  # file, workspace, level: checked by the schema on write
    )


def bundle_profile(
    manifest: Manifest, overrides: dict[str, dict[str, int]] | None = None, part: GraphPartRecord | None = None
) -> Profile:
    """The optimization profile of a bundle's graph (``part``: one of its ``graph.parts``; without
    it, the vision stage's inputs as a whole): its manifest's symbolic axes, flags on top."""
    inputs = (part or manifest["graph"])["inputs"]
    return optimization_profiles(inputs, manifest["dynamic_axes"], overrides)
