"""PyTorch -> ONNX for the vision tower + CCRA projector, with dynamic batch and text length.

Uses the dynamo exporter (``torch.onnx.export(dynamo=True)``), the path PyTorch maintains, and
writes the graph with external data when its weights approach protobuf's 2 GB limit.

Opsets: the exporter implements PyTorch's ops at opset 18 at the lowest (torchlib); asked for 17
it converts its unoptimised graph, fails on ReduceMean's ``axes`` input and silently keeps 18. So
an opset-17 graph (what TensorRT 8.5/8.6, JetPack 5, parse) is exported at 18 and lowered here,
after the exporter's constant folding, with onnx's version converter; the result is checked to
declare the opset asked for, or the build stops in one line.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import onnx
import torch
from onnx import version_converter

from ccra_export import __version__
from ccra_export.core.config import ModelConfig
from ccra_export.core.errors import ConfigError
from ccra_export.core.graph_scopes import NAME_SCOPES_KEY
from ccra_export.core.vision_graphs import (
    PIXEL_VALUES,
    TEXT_EMBEDS,
    TEXT_MASK,
    TOWER_FEATURES,
    WHOLE_CCRA,
    WHOLE_PLAIN,
    GraphPart,
)
from ccra_export.export.lpwca_op import TRANSLATION_TABLE, lpwca_mode
from ccra_export.model.ccra_plugin import CCRAModuleError
from ccra_export.model.vision_model import CCRAVisionModel, model_parts, part_module

DEFAULT_OPSET = 20
MIN_OPSET = 17  #: LayerNormalization
MAX_OPSET = 23  #: the newest opset this exporter and ONNX Runtime were checked with
#: The lowest opset torch.onnx's exporter implements (its torchlib); lower targets are converted down.
EXPORTER_OPSET = 18
BATCH_DIM = "batch"
TEXT_LEN_DIM = "text_len"
#: Above this many bytes of weights the graph is saved with external data (protobuf caps at 2 GiB).
EXTERNAL_DATA_AUTO_BYTES = 1536 << 20

ExternalData = Literal["auto", "always", "never"]


class UnsupportedOpsetError(ConfigError, ValueError):
    """An ``opset`` the export cannot honour (a ValueError too, for callers of the Python API)."""


def check_opset(opset: int) -> int:
    """``opset`` if the export can write it, else one line saying which opsets it can."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise UnsupportedOpsetError(f"LayerNormalization needs opset >= {MIN_OPSET}", field="opset", value=opset)
    if opset > MAX_OPSET:
        raise UnsupportedOpsetError(f"the export supports opsets {MIN_OPSET}..{MAX_OPSET}", field="opset", value=opset)
    return opset


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs optional-dependency notes (torchvision ops) and deprecation warnings
    that say nothing about this graph; keep the user's terminal for what matters."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def example_inputs(
    config: ModelConfig, batch: int = 2, text_len: int = 8, part: GraphPart | None = None
) -> tuple[torch.Tensor, ...]:
    """Tracing inputs of ``part`` (default: the single graph). Sizes above 1 so the exporter cannot
    specialise a dynamic axis to 1."""
    part = part or (WHOLE_PLAIN if config.ccra is None else WHOLE_CCRA)
    gen = torch.Generator().manual_seed(0)
    v = config.vision
    shapes = {
        PIXEL_VALUES: (batch, v.num_channels, v.image_size, v.image_size),
        TEXT_EMBEDS: (batch, text_len, config.text_hidden_size),
        TOWER_FEATURES: (
            batch,
            len(config.ccra.feature_layers) if config.ccra else 0,
            config.num_patches,
            v.hidden_size,
        ),
    }
    return tuple(
        torch.ones(batch, text_len, dtype=torch.int64)
        if name == TEXT_MASK
        else torch.randn(shapes[name], generator=gen)
        for name in part.inputs
    )


def _dynamic_shapes(part: GraphPart) -> dict[str, dict[int, torch.export.Dim]]:
    batch = torch.export.Dim(BATCH_DIM, min=1)
    text_len = torch.export.Dim(TEXT_LEN_DIM, min=1)
    axes = {TEXT_EMBEDS: {0: batch, 1: text_len}, TEXT_MASK: {0: batch, 1: text_len}}
    return {name: axes.get(name, {0: batch}) for name in part.inputs}


def export_model_proto(
    model: CCRAVisionModel, *, opset: int = DEFAULT_OPSET, lpwca: str = "portable", part: GraphPart | None = None
) -> onnx.ModelProto:
    """Trace ``model`` (or one ``part`` of it: the tower or CCRA's head, ``core.vision_graphs``) to
    an in-memory FP32 ONNX model with symbolic ``batch``/``text_len`` axes.

    ``lpwca="fused"`` emits CCRA stages 2-3 as one ``ccra::LPWCA`` node (see ``lpwca_op``).
    """
    check_opset(opset)
    config = model.config
    part = part or model_parts(model)[0]
    with _quiet_exporter(), torch.no_grad(), _plugin_export_errors(config), lpwca_mode(model, lpwca):
        program = torch.onnx.export(
            part_module(model.eval(), part),
            example_inputs(config, part=part),
            input_names=list(part.inputs),
            output_names=list(part.outputs),
            dynamic_shapes=_dynamic_shapes(part),
            opset_version=max(opset, EXPORTER_OPSET),
            dynamo=True,
            verbose=False,
            custom_translation_table=TRANSLATION_TABLE,
        )
    proto = program.model_proto
    _strip_trace_metadata(proto)
    if opset < EXPORTER_OPSET:
        proto = _lower_opset(proto, opset)
    proto.producer_name = "ccra-export"
    proto.producer_version = __version__
    io = f"{', '.join(part.inputs)} -> {', '.join(part.outputs)}"
    proto.doc_string = f"CCRA {part.name} graph ({config.variant}, {config.name}): {io}"
    onnx.helper.set_model_props(
        proto, {"ccra_export.variant": config.variant, "ccra_export.model": config.name, "ccra_export.graph": part.name}
    )
    return proto


@contextlib.contextmanager
def _plugin_export_errors(config: ModelConfig) -> Iterator[None]:
    """A plug-in CCRA module that torch.export cannot trace: one line naming it and what is expected
    (the reconstruction's export failing would be this toolkit's bug, and keeps its traceback)."""
    if config.ccra is None or not config.ccra.is_plugin:
        yield
        return
    try:
        yield
    except Exception as exc:  # torch.onnx's TorchExportError / ConversionError wrap the cause
        cause = exc.__cause__ or exc
        detail = " ".join(str(cause).split())[:240]
        raise CCRAModuleError(
            f"does not export to ONNX ({type(cause).__name__}: {detail}); "
            "its forward must trace with torch.export: tensor ops only, no Python branches on tensor values, "
            "dynamic batch and text length",
            field="ccra_module",
            value=config.ccra.module,
        ) from None


#: The one piece of exporter node metadata kept: module scopes, which precision passes use to
#: select the CCRA module's nodes (FP16 keeps them FP32, INT8 keeps them unquantized).
KEPT_NODE_METADATA = (NAME_SCOPES_KEY,)


def _strip_trace_metadata(proto: onnx.ModelProto) -> None:
    """Drop per-node Python stack traces and FX text: most of a small graph's bytes, and they
    would ship the build machine's source paths inside every artifact."""
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key in KEPT_NODE_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def _lower_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The exported (optimised) graph converted down to ``opset``; node metadata (the module
    scopes precision passes select by) is carried over by node name, which the converter keeps."""
    kept = {node.name: list(node.metadata_props) for node in proto.graph.node if node.metadata_props}
    try:
        lowered = version_converter.convert_version(proto, opset)
    except Exception as exc:  # the converter raises RuntimeError/ValueError/protobuf errors
        reason = " ".join(str(exc).split())[:160]
        raise UnsupportedOpsetError(
            f"onnx's version converter cannot lower this graph from opset {EXPORTER_OPSET} "
            f"({reason}); use {{opset}} {EXPORTER_OPSET} or later",
            field="opset",
            value=opset,
            mentions=("opset",),
        ) from None
    declared = {op.domain or "ai.onnx": op.version for op in lowered.opset_import}.get("ai.onnx")
    if declared != opset:
        raise UnsupportedOpsetError(
            f"the converted graph declares opset {declared}; use {{opset}} {EXPORTER_OPSET} or later",
            field="opset",
            value=opset,
            mentions=("opset",),
        )
    for node in lowered.graph.node:
        if node.name in kept and not node.metadata_props:
            node.metadata_props.extend(kept[node.name])
        _drop_noop_with_empty_axes(node, opset)
    # The converter also drops value_info it did not re-infer (initializers, folded constants);
    # the FP16 converter decides where to cast from these types, so they are put back (no
    # tensor's type changes between opsets 17 and 18).
    known = {v.name for v in lowered.graph.value_info}
    names = {i.name for i in lowered.graph.initializer}
    names.update(n for node in lowered.graph.node for n in (*node.input, *node.output))
    lowered.graph.value_info.extend(v for v in proto.graph.value_info if v.name in names and v.name not in known)
    try:
        onnx.checker.check_model(lowered)
    except onnx.checker.ValidationError as exc:
        reason = " ".join(str(exc).split())[:160]
        raise UnsupportedOpsetError(
            f"the graph lowered from opset {EXPORTER_OPSET} is not valid ({reason}); "
            f"use {{opset}} {EXPORTER_OPSET} or later",
            field="opset",
            value=opset,
            mentions=("opset",),
        ) from None
    return lowered


def _drop_noop_with_empty_axes(node: onnx.NodeProto, opset: int) -> None:
    """onnx's 18 -> 17 adapter moves a Reduce op's ``axes`` input back to an attribute but keeps
    ``noop_with_empty_axes``, which only ReduceSum has before opset 18. With axes given, or at its
    default 0, the attribute changes nothing and is dropped; an identity-on-empty-axes reduction
    cannot be written at ``opset`` and is refused."""
    if opset >= EXPORTER_OPSET or node.domain not in ("", "ai.onnx") or not node.op_type.startswith("Reduce"):
        return
    if node.op_type == "ReduceSum":
        return
    attrs = {a.name: a for a in node.attribute}
    noop = attrs.get("noop_with_empty_axes")
    if noop is None:
        return
    if noop.i and not (attrs.get("axes") and attrs["axes"].ints):
        raise UnsupportedOpsetError(
            f"{node.op_type} node {node.name} is an identity on empty axes, which opset {opset} "
            f"cannot express; use {{opset}} {EXPORTER_OPSET} or later",
            field="opset",
            value=opset,
            mentions=("opset",),
        )
    node.attribute.remove(noop)


def initializer_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def save_model(proto: onnx.ModelProto, path: Path, external_data: ExternalData = "auto") -> list[str]:
    """Save ``proto`` at ``path``; returns the bundle-relative file names written (graph first)."""
    use_external = external_data == "always" or (
        external_data == "auto" and initializer_bytes(proto) > EXTERNAL_DATA_AUTO_BYTES
    )
    path = Path(path)
    if not use_external:
        onnx.save_model(proto, str(path))
        return [path.name]
    location = f"{path.name}.data"
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )
    return [path.name, location]
