"""The INT8 branch of `ccra-export build`: calibration images -> Q/DQ graph -> caches -> parity inputs.

Parity for INT8 runs on held-out images (split off before calibration, never calibrated on),
against the FP32 PyTorch reference, plus a per-layer drift report against the FP32 graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ccra_export.calibration.images import CalibrationImage, CalibrationSet, load_calibration_set, split_held_out
from ccra_export.calibration.quantize import QUANTIZED_OP_TYPES, quantize_int8
from ccra_export.calibration.reader import ImageBatchReader, MappedReader, make_feeds
from ccra_export.calibration.text import TextEmbedder
from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import ConfigError
from ccra_export.core.image_preprocess import ImageProcessorConfig
from ccra_export.core.manifest import manifest_record
from ccra_export.core.manifest_schema import (
    CalibrationSettings,
    HeldOutImage,
    ImageProcessorRecord,
    ParityInputs,
    QuantizedGraph,
    SkippedImage,
)
from ccra_export.core.shapes import questions, random_scene, render
from ccra_export.core.vision_graphs import HEAD, PIXEL_VALUES, TOWER, TOWER_FEATURES, GraphPart
from ccra_export.demo import DEMO
from ccra_export.runtime.vision_backend import OrtBackend

ORT_CACHE = "calibration.json"
#: the demo's INT8 calibration without --calib-data: pictures of its own task, from this seed
DEMO_CALIBRATION_SEED = 2
DEMO_CALIBRATION_IMAGES = 64


@dataclass
class Int8Options:
    calib_data: Path | None = None
    prompts: Path | None = None
    method: str = "entropy"
    batch_size: int = 4
    holdout: int | None = None
    limit: int | None = None
    quantize_ccra: bool = False
    pad_to_square: bool = True


@dataclass
class Calibration:
    dataset: CalibrationSet
    processor: ImageProcessorConfig
    embedder: TextEmbedder | None


def make_embedder(source: Any, seed: int) -> TextEmbedder | None:
    """Instruction embeddings: the checkpoint's tokenizer and table, or a seeded table for presets."""
    config = source.config
    if config.ccra is None:
        return None
    if source.token_embeddings is not None:
        return TextEmbedder.from_checkpoint(Path(source.record["path"]), source.token_embeddings)
    return TextEmbedder.seeded(config.text_hidden_size, seed)


def processor_for(source: Any, pad_to_square: bool) -> ImageProcessorConfig:
    size = source.config.vision.image_size
    if source.record["kind"] == "checkpoint":
        path = Path(source.record["path"])
        return ImageProcessorConfig.from_checkpoint(path, size, pad_to_square=pad_to_square, check_crop=True)
    return ImageProcessorConfig.for_image_size(size, pad_to_square=pad_to_square)


def prepare(options: Int8Options, source: Any, seed: int, steps: Steps = SILENT) -> Calibration:
    """Read and split the images before the (slow) export, so bad calibration data fails first."""
    if options.calib_data is None and source.record.get("name") == DEMO:
        dataset = task_calibration_set(options.holdout, options.limit)
        steps.info(
            f"calibration: no --calib-data; {len(dataset.calibration)} generated shapes-task pictures (seed "
            f"{DEMO_CALIBRATION_SEED}), {len(dataset.held_out)} held out for parity"
        )
        return Calibration(dataset, processor_for(source, options.pad_to_square), make_embedder(source, seed))
    if options.calib_data is None:
        raise ConfigError(
            "{precision} int8 needs {calib_data} DIR (a folder of .jpg/.png calibration images)",
            mentions=("precision", "calib_data"),
        )
    with (
        steps.step(f"Reading calibration images from {options.calib_data}"),
        warnings.catch_warnings(record=True) as seen,
    ):
        warnings.simplefilter("always")
        dataset = load_calibration_set(
            Path(options.calib_data), prompts=options.prompts, holdout=options.holdout, limit=options.limit
        )
    for warning in seen:
        steps.warn(str(warning.message))
    steps.info(
        f"calibration: {len(dataset.calibration)} images, {len(dataset.held_out)} held out for parity"
        + (f", {len(dataset.skipped)} unreadable skipped" if dataset.skipped else "")
    )
    if len(dataset.calibration) < options.batch_size:
        steps.warn(
            f"{len(dataset.calibration)} calibration images for --calib-batch-size "
            f"{options.batch_size}: calibrating in one batch of {len(dataset.calibration)}"
        )
    return Calibration(dataset, processor_for(source, options.pad_to_square), make_embedder(source, seed))


def task_calibration_set(holdout: int | None, limit: int | None) -> CalibrationSet:
    """The demo's own task, generated (``core.shapes``), each picture with one of its questions."""
    rng = np.random.default_rng(DEMO_CALIBRATION_SEED)
    items = []
    for index in range(min(limit or DEMO_CALIBRATION_IMAGES, DEMO_CALIBRATION_IMAGES)):
        scene = random_scene(rng)
        name = Path(f"shapes_{DEMO_CALIBRATION_SEED}_{index:05d}.png")
        items.append(CalibrationImage(name, render(scene), questions(scene, rng, 1)[0].question))
    return split_held_out(items, holdout, "generated pictures")


Transform = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def part_inputs(part: GraphPart, fp32_tower: Path) -> Transform | None:
    """What one graph of a split bundle calibrates on, from the images' full inputs: the tower
    its pixels; CCRA's head the FP32 tower graph's output (``fp32_tower``, already written) with
    the instruction, as the whole graph's calibrator would see it. None: the single graph."""
    if part.name == TOWER.name:
        return lambda feeds: {name: feeds[name] for name in TOWER.inputs}
    if part.name != HEAD.name:
        return None
    tower = OrtBackend(fp32_tower)

    def head_inputs(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = tower.run({PIXEL_VALUES: feeds[PIXEL_VALUES]})[TOWER_FEATURES]
        return {TOWER_FEATURES: features, **{k: v for k, v in feeds.items() if k != PIXEL_VALUES}}

    return head_inputs


def quantize(
    fp32_model: Path,
    stage: Path,
    graph_file: str,
    calibration: Calibration,
    options: Int8Options,
    steps: Steps = SILENT,
    *,
    transform: Transform | None = None,
    ort_cache: str = ORT_CACHE,
) -> tuple[list[str], CalibrationSettings, QuantizedGraph]:
    """Write the Q/DQ graph and ONNX Runtime's calibration cache (``ort_cache``) into ``stage``;
    ``transform`` maps the images' inputs to this graph's (``part_inputs``).

    Returns the graph files and the manifest's calibration record: what every graph was calibrated
    with, and this graph's own counts and cache."""
    images = calibration.dataset.calibration
    title = f"Calibrating {graph_file} ({options.method}, {len(images)} images) and inserting Q/DQ"
    with steps.progress(title, total=len(images), unit="images") as advance:
        reader = ImageBatchReader(images, calibration.processor, calibration.embedder, options.batch_size, advance)
        summary = quantize_int8(
            fp32_model,
            stage / graph_file,
            reader if transform is None else MappedReader(reader, transform),
            method=options.method,
            ort_cache=stage / ort_cache,
            quantize_ccra=options.quantize_ccra,
        )
    graph_files = sorted(p.name for p in stage.iterdir() if p.name == graph_file or p.name.startswith(f"{graph_file}."))
    graph_files.sort(key=lambda name: name != graph_file)  # the graph first, its external data after
    settings = CalibrationSettings(
        method=summary.method,
        quantize_ccra=summary.quantize_ccra,
        per_channel=summary.per_channel,
        quantized_op_types=list(QUANTIZED_OP_TYPES),
        format="QDQ, symmetric int8 activations and per-channel weights",
        calibration_dir=str(Path(options.calib_data).resolve())
        if options.calib_data
        else f"generated: shapes task, seed {DEMO_CALIBRATION_SEED}",
        images_used=[item.path.name for item in images],
        held_out=[HeldOutImage(file=item.path.name, prompt=item.prompt) for item in calibration.dataset.held_out],
        skipped=[SkippedImage(file=p.name, reason=r) for p, r in calibration.dataset.skipped],
        prompts=str(options.prompts) if options.prompts else "default instructions",
        batch_size=reader.batch_size,
        processor=processor_record(calibration.processor, "calibration.processor"),
        text_embeddings=calibration.embedder.source if calibration.embedder else None,
    )
    graph = QuantizedGraph(
        quantized_nodes=summary.quantized_nodes, excluded_nodes=summary.excluded_nodes, ort_cache=ort_cache
    )
    return graph_files, settings, graph


def processor_record(processor: ImageProcessorConfig, key: str = "image_processor") -> ImageProcessorRecord:
    """The image processor as the manifest records it (``image_processor``, ``calibration.processor``)."""
    return manifest_record(ImageProcessorRecord, asdict(processor), key)


def held_out_feeds(calibration: Calibration) -> tuple[dict[str, np.ndarray], ParityInputs]:
    items = calibration.dataset.held_out
    described = ParityInputs(kind="held-out images", images=[i.path.name for i in items], batch=len(items))
    return make_feeds(items, calibration.processor, calibration.embedder), described
