"""The vision graph(s) a bundle holds: one graph, or the CLIP tower and CCRA's head apart.

CCRA conditions the visual tokens on the instruction, but the CLIP tower (most of the vision
compute) does not read the instruction. A split bundle (``build --split-vision``) therefore holds
two graphs: ``vision_tower.onnx`` (pixels -> the stacked hidden states CCRA reads) runs once per
image and its output is cached; ``ccra_head.onnx`` (those states + the instruction -> visual
tokens) runs once per question. Both together compute exactly what the single graph computes.

Torch-free: the export, the runtime and the manifest all name the parts from here. In the manifest
(format 3) every bundle's graphs are a list, ``graph.parts``: a single graph is the one part
``vision``. Readers take the parts from ``part_records`` and ``engine_records`` and never branch on
the layout; ``is_split`` is for what only a split bundle has (the tower-output cache).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

from ccra_export.core.manifest_schema import EngineBuild, GraphPartRecord, Manifest, PartName

PIXEL_VALUES = "pixel_values"
TEXT_EMBEDS = "text_embeds"
TEXT_MASK = "text_mask"
TOWER_FEATURES = "tower_features"  #: [batch, L, N, Dv]: the hidden states of CCRA's feature layers
VISUAL_TOKENS = "visual_tokens"
#: [batch, L, N]: float32 at every precision, FP16 graphs included (its mean 1/(L*N) is below FP16's
#: smallest normal at llava-1.5-7b sizes; export/fp16.py); older FP16 bundles give float16
LPWCA_ATTENTION = "lpwca_attention"


@dataclass(frozen=True)
class GraphPart:
    """One exported graph of a bundle: its name, files and I/O names."""

    name: PartName
    file: str
    engine_file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


WHOLE_CCRA = GraphPart(
    "vision", "vision.onnx", "vision.engine", (PIXEL_VALUES, TEXT_EMBEDS, TEXT_MASK), (VISUAL_TOKENS, LPWCA_ATTENTION)
)
WHOLE_PLAIN = GraphPart("vision", "vision.onnx", "vision.engine", (PIXEL_VALUES,), (VISUAL_TOKENS,))
TOWER = GraphPart("vision_tower", "vision_tower.onnx", "vision_tower.engine", (PIXEL_VALUES,), (TOWER_FEATURES,))
HEAD = GraphPart(
    "ccra_head",
    "ccra_head.onnx",
    "ccra_head.engine",
    (TOWER_FEATURES, TEXT_EMBEDS, TEXT_MASK),
    (VISUAL_TOKENS, LPWCA_ATTENTION),
)
PARTS = {part.name: part for part in (WHOLE_CCRA, TOWER, HEAD)}


def graph_parts(*, ccra: bool, split: bool, attention: bool = True) -> tuple[GraphPart, ...]:
    """The graphs a build writes, in execution order. ``attention``: the CCRA module returns its
    attention map (the reconstruction does; a plug-in module may not)."""
    if not ccra:
        return (WHOLE_PLAIN,)
    parts = (TOWER, HEAD) if split else (WHOLE_CCRA,)
    if attention:
        return parts
    return tuple(replace(p, outputs=(VISUAL_TOKENS,)) if p.name != TOWER.name else p for p in parts)


def parts_from_manifest(manifest: Manifest) -> tuple[GraphPart, ...]:
    """The bundle's graphs as ``GraphPart``s, with the I/O names its manifest records."""
    return tuple(
        replace(
            PARTS[record["name"]],
            file=record["file"],
            inputs=tuple(spec["name"] for spec in record["inputs"]),
            outputs=tuple(spec["name"] for spec in record["outputs"]),
        )
        for record in part_records(manifest)
    )


def is_split(manifest: Manifest) -> bool:
    """The bundle runs CLIP's tower and CCRA's head as two graphs (``SplitVision``)."""
    return len(manifest["graph"]["parts"]) > 1


def part_records(manifest: Manifest) -> list[GraphPartRecord]:
    """The manifest's record of each graph (``name``, ``file``, ``external_data``, ``inputs``,
    ``outputs``), in execution order: one for a single-graph bundle, tower then head when split."""
    return list(manifest["graph"]["parts"])


def engine_records(manifest: Manifest) -> dict[str, EngineBuild]:
    """``{part name: engine record}`` for the bundle's TensorRT engines (empty without one): each
    part's own settings with what the build's engines share (TensorRT version, GPU, plugin)."""
    engine = manifest["engine"]
    if not engine:
        return {}
    shared = {key: value for key, value in engine.items() if key != "parts"}
    return {
        record["part"]: cast(EngineBuild, {**shared, **{k: v for k, v in record.items() if k != "part"}})
        for record in engine["parts"]
    }
