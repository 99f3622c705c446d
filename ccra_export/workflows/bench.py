"""`ccra-export bench --bundle`: the bundle vs PyTorch, same model, same inputs, same run.

With a language model in the bundle, the whole pipeline against Hugging Face generate; without
one (or with --vision-only), the vision graph or engine against the PyTorch reference on the
parity inputs the build recorded. Where PyTorch is not installed (a Jetson), or the checkpoint
is not given (``--model``: a manifest's recorded path is provenance, never opened), the bundle is
timed alone and the reason is returned for the one line the CLI prints.

Each side runs in its own spawned process, so its peak memory is its own. Measured: vision
latency, time to first token (preprocessing + vision + prefill), decode tokens/s (end-of-sequence
disabled so both decode the same number of tokens). The Hugging Face side is the checkpoint's
vision path in PyTorch (our reference model: Hugging Face's CLIP tower, with CCRA when the bundle
has it) feeding ``LlavaForConditionalGeneration.generate`` the spliced embeddings.

Every figure is a ``Spread`` over the timed rounds (one warm-up round first): median, min and
max, because a busy machine moves single rounds by orders of magnitude. The two sides run one
after the other, so their rounds do not pair: a ratio's range divides one side's extremes by the
other's (its widest honest range), its middle is the ratio of the medians.

Each side's imports are made inside its own function, so a side's process loads only what that
side needs (ours never loads torch) and its peak memory is not inflated by the other's stack.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ccra_export.core.manifest_schema import Manifest

PROMPT = "Describe the image in detail."
SECOND_PROMPT = "What colour is the largest object?"  # a split bundle's question 2 about the same image
DEFAULT_REPEATS = 10  # timed rounds, after one warm-up round
NO_TORCH = "PyTorch is not installed here"


@dataclass(frozen=True)
class Spread:
    """A figure over the timed rounds: why a single number misleads on a shared machine."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> Spread:
        scaled = [v * scale for v in values]
        return cls(statistics.median(scaled), min(scaled), max(scaled))

    def over(self, other: Spread) -> Spread:
        """``self / other``: the ratio of medians, and the range from the extremes of both sides."""
        return Spread(self.median / other.median, self.low / max(other.high, 1e-12), self.high / max(other.low, 1e-12))


@dataclass
class Figures:
    side: str
    vision_ms: Spread
    first_token_ms: Spread
    decode_tokens_per_s: Spread
    new_tokens: int
    peak_rss_mb: float
    rounds: int = 0
    #: split bundles: the same image again (its tower output cached): vision, and first token of question 2
    vision_cached_ms: Spread | None = None
    first_token_cached_ms: Spread | None = None
    tower_cache: dict[str, int] | None = None  # hits, misses, entries, bytes (CacheStats) after the rounds


@dataclass
class BenchResult:
    """The sides that ran (ours first) and, when the PyTorch side did not, why not."""

    figures: list[Any] = field(default_factory=list)
    skipped: str | None = None


def busy_machine() -> str | None:
    """One line when other processes already load the CPUs before the run: PyTorch's OpenMP threads
    then wait on descheduled peers at every op (a tiny vision tower measured 4 ms idle and up to
    900 ms on this 2-core machine under others' test runs), so read the ranges, not the medians."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return None
    cores = os.cpu_count() or 1
    if load < 0.75 * cores:
        return None
    return (
        f"load average {load:.1f} on {cores} cores before the run: other processes compete for the CPUs, "
        "so timings and ratios vary widely; see each figure's (min–max)"
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ours(
    bundle: str, image: str | None, tokens: int, repeats: int, backend: str, plugin_library: str | None
) -> Figures:
    from ccra_export.core.image_preprocess import preprocess
    from ccra_export.runtime.inputs import InputError
    from ccra_export.runtime.language_model import Sampling
    from ccra_export.runtime.vlm_pipeline import load_image
    from ccra_export.workflows.backends import open_pipeline

    pipeline = open_pipeline(bundle, backend, plugin_library=Path(plugin_library) if plugin_library else None)
    picture = load_image(image) if image else _default_image()
    pixels = {"pixel_values": preprocess(picture, pipeline.processor)[None]}
    if pipeline.ccra:
        ids = pipeline.tokenizer.encode(PROMPT, add_special_tokens=False).ids
        pixels.update(text_embeds=pipeline.lm.embed(ids).astype(np.float32), text_mask=np.ones((1, len(ids)), np.int64))
    length = pipeline.prepare(picture, PROMPT).inputs_embeds.shape[1]
    if length + tokens > pipeline.lm.context_length:  # what `run` refuses, in its words
        raise InputError(
            f"the benchmark prompt's {length} tokens (image included) + {tokens} new "
            f"tokens exceed the context of {pipeline.lm.context_length}",
            field="max_new_tokens",
            value=tokens,
        )
    cache = pipeline.tower_cache  # a split bundle: the tower's outputs, per image
    vision, first, rate, vision_again, first_again = [], [], [], [], []
    for _ in range(repeats + 1):  # the first round warms up
        if cache is not None:
            cache.clear()  # a new image: the tower runs
        start = time.perf_counter()
        pipeline.vision.run(pixels)
        vision.append(time.perf_counter() - start)
        if cache is not None:  # the same image again: only CCRA's head runs
            start = time.perf_counter()
            pipeline.vision.run(pixels)
            vision_again.append(time.perf_counter() - start)
            cache.clear()
        start = time.perf_counter()
        prepared = pipeline.prepare(picture, PROMPT)
        generation = pipeline.lm.generate(prepared.inputs_embeds, Sampling(max_new_tokens=tokens))
        first.append(time.perf_counter() - start - generation.decode_s)
        rate.append((len(generation.tokens) - 1) / max(generation.decode_s, 1e-9))
        if cache is not None:  # question 2 about the same image: preprocessing, head, prefill, first token
            start = time.perf_counter()
            prepared = pipeline.prepare(picture, SECOND_PROMPT)
            pipeline.lm.generate(prepared.inputs_embeds, Sampling(max_new_tokens=1))
            first_again.append(time.perf_counter() - start)
    return Figures(
        f"ccra-export ({pipeline.vision.description})",
        Spread.of(vision[1:], 1e3),
        Spread.of(first[1:], 1e3),
        Spread.of(rate[1:]),
        tokens,
        _peak_rss_mb(),
        repeats,
        Spread.of(vision_again[1:], 1e3) if cache is not None else None,
        Spread.of(first_again[1:], 1e3) if cache is not None else None,
        cache.stats().to_dict() if cache is not None else None,
    )


def _default_image():
    from PIL import Image

    gradient = bytes((x * 255 // 335) for _ in range(336) for x in range(336))
    return Image.frombytes("L", (336, 336), gradient).convert("RGB")


class _TokenClock:
    """A transformers streamer that only takes the time: ``put`` is called with the prompt, then
    with each new token as it is chosen (on CPU; transformers defers it by a step only on MPS).
    It replaces a 1-token generate whose prefill was subtracted from an N-token one: on a tiny
    model that difference was noise, and a round's decode rate came out negative or infinite."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf(checkpoint: str, bundle: str, image: str | None, tokens: int, repeats: int) -> Figures:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from ccra_export.core.image_preprocess import preprocess
    from ccra_export.core.manifest import read_manifest
    from ccra_export.runtime.vlm_pipeline import TEMPLATE, load_image, processor_from_manifest
    from ccra_export.workflows.source import source_from_manifest

    hf_logging.disable_progress_bar()
    manifest = read_manifest(bundle)
    vision_model = source_from_manifest(manifest, checkpoint).model  # refuses a checkpoint with other weights
    llava = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    llava.generation_config.eos_token_id = None  # both sides decode the same number of tokens
    table = llava.model.language_model.embed_tokens.weight.detach()
    tokenizer = Tokenizer.from_file(str(Path(bundle) / "lm" / "decoder" / "tokenizer.json"))
    image_id = manifest["language_model"]["image_token_id"]
    picture = load_image(image) if image else _default_image()
    processor = processor_from_manifest(manifest)
    ids = tokenizer.encode(TEMPLATE.format(prompt=PROMPT)).ids
    position = ids.index(image_id)
    vision, first, rate = [], [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            args = [torch.from_numpy(preprocess(picture, processor)[None])]
            if vision_model.ccra is not None:
                instruction = tokenizer.encode(PROMPT, add_special_tokens=False).ids
                args += [table[instruction][None], torch.ones(1, len(instruction), dtype=torch.int64)]
            out = vision_model(*args)
            visual = out[0] if isinstance(out, tuple) else out
            vision.append(time.perf_counter() - start)
            embeds = torch.cat([table[ids[:position]][None], visual, table[ids[position + 1 :]][None]], dim=1)
            clock = _TokenClock()
            llava.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
            # one run gives both: the first token's arrival, and the decode rate from first to last token
            arrived = clock.times[-tokens:]  # the last `tokens` calls are the new tokens (the prompt's comes first)
            first.append(arrived[0] - start)
            rate.append((tokens - 1) / max(arrived[-1] - arrived[0], 1e-9))
    return Figures(
        "Hugging Face (PyTorch eager)",
        Spread.of(vision[1:], 1e3),
        Spread.of(first[1:], 1e3),
        Spread.of(rate[1:]),
        tokens,
        _peak_rss_mb(),
        repeats,
    )


def _reference_checkpoint(manifest: Manifest, model: str | None) -> str | None:
    from ccra_export.workflows.source import reference_checkpoint

    return reference_checkpoint(manifest, model)


def pytorch_side_skipped(manifest: Manifest, model: str | None) -> str | None:
    """Why the PyTorch side cannot run here (None when it can): checked before anything is timed,
    with the fix in the same line. A ``--model`` that cannot be the source is refused instead."""
    from ccra_export.core.errors import CheckpointError, ConfigError
    from ccra_export.core.extras import available, install_hint
    from ccra_export.workflows.source import recorded_module

    source = manifest["source"]
    if source["kind"] == "preset" and model is not None:
        raise ConfigError(
            "{model} applies to bundles built from a checkpoint; this one was built from a preset", mentions=("model",)
        )
    if not available("export"):  # first: on a Jetson, the checkpoint would not help
        return f"{NO_TORCH}; timed the bundle alone (to compare: {install_hint('export')})"
    if (module := recorded_module(manifest)) is not None:
        return (
            f"the bundle's CCRA module is the plug-in {module}, which bench does not import on a manifest's word; "
            "timed the bundle alone (`check --ccra-module` compares it with PyTorch)"
        )
    if source["kind"] == "preset":
        return None
    if model is None:
        return (
            f"no --model: pass --model DIR, the checkpoint this bundle was built from (recorded as {source['path']}), "
            "to time PyTorch on it too"
        )
    if not Path(model).is_dir():
        raise CheckpointError("no such checkpoint directory", field="model", value=model)
    return None


def check_batch(manifest: Manifest, batch: int) -> None:
    """Refuse a batch beyond what the bundle was built for: its profile's maximum, and its engine's."""
    from ccra_export.core.errors import BundleError
    from ccra_export.core.vision_graphs import engine_records

    limits = {"the bundle's profile (max_batch at build)": manifest["dynamic_axes"].get("batch", {}).get("max")}
    for part, engine in engine_records(manifest).items():  # a split bundle: the tower's and the head's
        shapes = next(iter((engine.get("profile") or {}).values()), None)  # first input's (min, opt, max)
        if shapes:
            engine_name = "TensorRT engine" if part == "vision" else f"{part} engine"
            limits[f"its {engine_name}'s profile (max_batch of the engine step)"] = shapes[-1][0]
    for where, limit in limits.items():
        if isinstance(limit, int) and batch > limit:
            raise BundleError(f"above {limit}, the largest batch of {where}", field="batch", value=batch)


def run_bench(
    bundle: Path,
    image: Path | None,
    tokens: int = 32,
    repeats: int = DEFAULT_REPEATS,
    backend: str = "auto",
    *,
    model: str | None = None,
    plugin_library: Path | None = None,
) -> BenchResult:
    """The whole pipeline, ours then Hugging Face's (when PyTorch and ``model``, the checkpoint, are
    here; else ``skipped`` says why and ours is timed alone)."""
    from ccra_export.core.errors import no_language_model
    from ccra_export.core.manifest import read_manifest
    from ccra_export.runtime.inputs import load_image
    from ccra_export.runtime.ort_session import import_onnxruntime

    manifest = read_manifest(bundle)
    if not manifest.get("language_model"):
        raise no_language_model(bundle)
    if image is not None:
        load_image(image)  # a bad image fails before anything loads
    import_onnxruntime()  # the language model runs on it: refuse here, in one line, not in the spawned side
    model = _reference_checkpoint(manifest, model)
    skipped = pytorch_side_skipped(manifest, model)
    context = multiprocessing.get_context("spawn")
    args = (str(bundle), str(image) if image else None, tokens, repeats)
    with context.Pool(1) as pool:
        ours = pool.apply(_ours, (*args, backend, str(plugin_library) if plugin_library else None))
    if skipped:
        return BenchResult([ours], skipped)
    with context.Pool(1) as pool:
        theirs = pool.apply(_hf, (str(model), *args))
    return BenchResult([ours, theirs])


@dataclass
class VisionFigures:
    side: str
    batch: int
    vision_ms: Spread
    images_per_s: Spread
    peak_rss_mb: float
    cosine_vs_pytorch: float | None = None
    rounds: int = 0
    vision_cached_ms: Spread | None = None  # split bundles: the same images again (tower outputs cached)
    tower_cache: dict[str, int] | None = None


def _batch_of(arrays: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows cycled from the recorded samples (rows are independent)."""
    return {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:])).astype(v.dtype)) for k, v in arrays.items()}


def _timed(fn: Any, repeats: int) -> tuple[list[float], Any]:
    result = fn()  # warm-up (ORT arena, TensorRT context, PyTorch allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def _vision_figures(side: str, batch: int, seconds: list[float], repeats: int) -> VisionFigures:
    return VisionFigures(
        side,
        batch,
        Spread.of(seconds, 1e3),
        Spread.of([batch / max(s, 1e-12) for s in seconds]),
        _peak_rss_mb(),
        None,
        repeats,
    )


def _vision_ours(
    bundle: str, batch: int, repeats: int, backend: str, plugin_library: str | None
) -> tuple[VisionFigures, dict]:
    from ccra_export.core.manifest import bundle_path, read_manifest
    from ccra_export.core.reference_record import load_reference
    from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB, TowerCache, tower_bytes_per_image
    from ccra_export.workflows.backends import open_bundle_backend

    manifest = read_manifest(bundle)
    library = Path(plugin_library) if plugin_library else None
    cache = TowerCache(max(DEFAULT_TOWER_CACHE_MIB << 20, batch * tower_bytes_per_image(manifest)))  # holds the batch
    runner, _ = open_bundle_backend(bundle, manifest, backend, library, cache)
    feeds, _ = load_reference(bundle_path(bundle, manifest["reference"]["file"], "reference.file"))
    feeds = _batch_of(feeds, batch)
    cache = getattr(runner, "cache", None)

    def new_images() -> dict[str, np.ndarray]:
        if cache is not None:
            cache.clear()  # every round is new images: the tower runs
        return runner.run(feeds)

    seconds, outputs = _timed(new_images, repeats)
    first = next(iter(outputs))
    figures = _vision_figures(f"ccra-export ({runner.description})", batch, seconds, repeats)
    if cache is not None:
        again, _ = _timed(lambda: runner.run(feeds), repeats)  # the same images again: CCRA's head alone
        figures.vision_cached_ms, figures.tower_cache = Spread.of(again, 1e3), cache.stats().to_dict()
    return figures, {first: np.asarray(outputs[first], np.float32)}


def _vision_pytorch(bundle: str, batch: int, repeats: int, model: str | None) -> tuple[VisionFigures, dict]:
    import torch

    from ccra_export.core.manifest import bundle_path, read_manifest
    from ccra_export.core.reference_record import load_reference
    from ccra_export.model.vision_model import reference_outputs
    from ccra_export.workflows.source import source_from_manifest

    manifest = read_manifest(bundle)
    source = source_from_manifest(manifest, model)
    feeds, _ = load_reference(bundle_path(bundle, manifest["reference"]["file"], "reference.file"))
    feeds = _batch_of(feeds, batch)
    with torch.inference_mode():
        seconds, outputs = _timed(lambda: reference_outputs(source.model, feeds), repeats)
    return _vision_figures(f"PyTorch eager (torch {torch.__version__})", batch, seconds, repeats), outputs


def run_vision_bench(
    bundle: Path,
    batch: int = 1,
    repeats: int = DEFAULT_REPEATS,
    backend: str = "auto",
    *,
    model: str | None = None,
    plugin_library: Path | None = None,
) -> BenchResult:
    """Vision latency of the bundle's graph or engine, and of the PyTorch reference when PyTorch and
    the bundle's source are here (else why not), on the recorded parity inputs."""
    from ccra_export.core.errors import BundleError
    from ccra_export.core.manifest import read_manifest
    from ccra_export.core.parity import compare_output, thresholds_for
    from ccra_export.runtime.ort_session import import_onnxruntime

    manifest = read_manifest(bundle)
    if not manifest.get("reference"):
        raise BundleError("has no recorded parity inputs (built by an older ccra-export)", field="bundle", value=bundle)
    check_batch(manifest, batch)
    if backend in ("ort", "ort-trt") or (backend == "auto" and not manifest.get("engine")):
        import_onnxruntime()  # ONNX Runtime will run the graph: refuse here, in one line
    model = _reference_checkpoint(manifest, model)
    skipped = pytorch_side_skipped(manifest, model)
    context = multiprocessing.get_context("spawn")
    library = str(plugin_library) if plugin_library else None
    with context.Pool(1) as pool:
        ours, our_outputs = pool.apply(_vision_ours, (str(bundle), batch, repeats, backend, library))
    if skipped:
        return BenchResult([ours], skipped)
    with context.Pool(1) as pool:
        theirs, reference = pool.apply(_vision_pytorch, (str(bundle), batch, repeats, model))
    name = next(iter(our_outputs))
    agreement = compare_output(name, our_outputs[name], reference[name], thresholds_for(manifest["precision"]))
    ours.cosine_vs_pytorch = agreement.cosine
    return BenchResult([ours, theirs])
