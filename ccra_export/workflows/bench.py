"""`ccra-export bench --bundle`: the bundle vs PyTorch, same model, same inputs, same run.

With a language model in the bundle, the whole pipeline against Hugging Face generate; without
one (or with --vision-only), the vision graph or engine against the PyTorch reference on the
parity inputs the build recorded.

Each side runs in its own spawned process, so its peak memory is its own. Measured: vision
latency, time to first token (preprocessing + vision + prefill), decode tokens/s (end-of-sequence
disabled so both decode the same number of tokens). The Hugging Face side is the checkpoint's
vision path in PyTorch (our reference model: Hugging Face's CLIP tower, with CCRA when the bundle
has it) feeding ``LlavaForConditionalGeneration.generate`` the spliced embeddings.

Each side's imports are made inside its own function, so a side's process loads only what that
side needs (ours never loads torch) and its peak memory is not inflated by the other's stack.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "Describe the image in detail."


@dataclass
class Figures:
    side: str
    vision_ms: float
    first_token_ms: float
    decode_tokens_per_s: float
    new_tokens: int
    peak_rss_mb: float


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _ours(bundle: str, image: str | None, tokens: int, repeats: int, backend: str) -> dict[str, Any]:
    from ccra_export.core.image_preprocess import preprocess
    from ccra_export.runtime.language_model import Sampling
    from ccra_export.runtime.vlm_pipeline import Pipeline, load_image

    pipeline = Pipeline.from_bundle(bundle, backend=backend)
    picture = load_image(image) if image else _default_image()
    pixels = {"pixel_values": preprocess(picture, pipeline.processor)[None]}
    if pipeline.ccra:
        ids = pipeline.tokenizer.encode(PROMPT, add_special_tokens=False).ids
        pixels.update(text_embeds=pipeline.lm.embed(ids).astype(np.float32), text_mask=np.ones((1, len(ids)), np.int64))
    vision, first, rate = [], [], []
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        pipeline.vision.run(pixels)
        vision.append(time.perf_counter() - start)
        start = time.perf_counter()
        prepared = pipeline.prepare(picture, PROMPT)
        generation = pipeline.lm.generate(prepared.inputs_embeds, Sampling(max_new_tokens=tokens))
        first.append(time.perf_counter() - start - generation.decode_s)
        rate.append((len(generation.tokens) - 1) / generation.decode_s)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return asdict(
        Figures(
            f"ccra-export ({pipeline.vision.description})",
            _median(vision[1:]) * 1e3,
            _median(first[1:]) * 1e3,
            _median(rate[1:]),
            tokens,
            peak,
        )
    )


def _default_image():
    from PIL import Image

    gradient = bytes((x * 255 // 335) for _ in range(336) for x in range(336))
    return Image.frombytes("L", (336, 336), gradient).convert("RGB")


def _hf(checkpoint: str, bundle: str, image: str | None, tokens: int, repeats: int) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from ccra_export.core.image_preprocess import preprocess
    from ccra_export.core.manifest import read_manifest
    from ccra_export.model.checkpoint import load_checkpoint
    from ccra_export.runtime.vlm_pipeline import TEMPLATE, load_image, processor_from_manifest

    hf_logging.disable_progress_bar()
    manifest = read_manifest(bundle)
    vision_model = load_checkpoint(checkpoint).model
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
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            llava.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
            first.append(time.perf_counter() - start)
            start = time.perf_counter()
            llava.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )
            # decode rate: the N-token run minus its own prefill (the 1-token run's time after vision)
            rate.append((tokens - 1) / max(time.perf_counter() - start - (first[-1] - vision[-1]), 1e-9))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return asdict(
        Figures(
            "Hugging Face (PyTorch eager)",
            _median(vision[1:]) * 1e3,
            _median(first[1:]) * 1e3,
            _median(rate[1:]),
            tokens,
            peak,
        )
    )


def run_bench(
    bundle: Path, image: Path | None, tokens: int = 32, repeats: int = 3, backend: str = "auto"
) -> list[Figures]:
    from ccra_export.core.errors import BundleError
    from ccra_export.core.extras import require_export_stack
    from ccra_export.core.manifest import read_manifest

    manifest = read_manifest(bundle)
    require_export_stack("ccra-export bench (its Hugging Face side)")
    if not manifest.get("language_model"):
        raise BundleError(f"--bundle {bundle}: holds no language model; rebuild it with --lm-precision")
    if manifest["source"]["kind"] != "checkpoint" or not Path(manifest["source"]["path"]).is_dir():
        raise BundleError(f"--bundle {bundle}: its source checkpoint is not here; the Hugging Face side needs it")
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        ours = pool.apply(_ours, (str(bundle), str(image) if image else None, tokens, repeats, backend))
    with context.Pool(1) as pool:
        theirs = pool.apply(
            _hf, (manifest["source"]["path"], str(bundle), str(image) if image else None, tokens, repeats)
        )
    return [Figures(**ours), Figures(**theirs)]


@dataclass
class VisionFigures:
    side: str
    batch: int
    vision_ms: float
    images_per_s: float
    peak_rss_mb: float
    cosine_vs_pytorch: float | None = None


def _batch_of(arrays: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows cycled from the recorded samples (rows are independent)."""
    return {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:])).astype(v.dtype)) for k, v in arrays.items()}


def _timed(fn: Any, repeats: int) -> tuple[float, Any]:
    result = fn()  # warm-up (ORT arena, TensorRT context, PyTorch allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return _median(times), result


def _vision_ours(bundle: str, batch: int, repeats: int, backend: str) -> tuple[dict[str, Any], dict]:
    from ccra_export.core.manifest import read_manifest
    from ccra_export.core.reference_record import load_reference
    from ccra_export.runtime.backends import bundle_backend

    manifest = read_manifest(bundle)
    runner, _ = bundle_backend(bundle, manifest, backend)
    feeds, _ = load_reference(Path(bundle) / manifest["reference"]["file"])
    feeds = _batch_of(feeds, batch)
    seconds, outputs = _timed(lambda: runner.run(feeds), repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first = next(iter(outputs))
    figures = VisionFigures(f"ccra-export ({runner.description})", batch, seconds * 1e3, batch / seconds, peak)
    return asdict(figures), {first: np.asarray(outputs[first], np.float32)}


def _vision_pytorch(bundle: str, batch: int, repeats: int) -> tuple[dict[str, Any], dict]:
    import torch

    from ccra_export.core.manifest import read_manifest
    from ccra_export.core.reference_record import load_reference
    from ccra_export.model.vision_model import reference_outputs
    from ccra_export.workflows.source import source_from_manifest

    manifest = read_manifest(bundle)
    source = source_from_manifest(manifest, None)
    feeds, _ = load_reference(Path(bundle) / manifest["reference"]["file"])
    feeds = _batch_of(feeds, batch)
    with torch.inference_mode():
        seconds, outputs = _timed(lambda: reference_outputs(source.model, feeds), repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = VisionFigures(f"PyTorch eager (torch {torch.__version__})", batch, seconds * 1e3, batch / seconds, peak)
    return asdict(figures), outputs


def run_vision_bench(
    bundle: Path, batch: int = 1, repeats: int = 10, backend: str = "auto"
) -> tuple[list[VisionFigures], str | None]:
    """Vision latency of the bundle's graph or engine, and of the PyTorch reference when PyTorch and
    the bundle's source are here (else why not), on the recorded parity inputs."""
    from ccra_export.core.errors import BundleError
    from ccra_export.core.extras import export_stack_available
    from ccra_export.core.manifest import read_manifest
    from ccra_export.core.parity import compare_output, thresholds_for

    manifest = read_manifest(bundle)
    if not manifest.get("reference"):
        raise BundleError(f"--bundle {bundle}: has no recorded parity inputs (built by an older ccra-export)")
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        ours, our_outputs = pool.apply(_vision_ours, (str(bundle), batch, repeats, backend))
    ours = VisionFigures(**ours)
    source = manifest["source"]
    skipped = None
    if not export_stack_available():
        skipped = "PyTorch is not installed here"
    elif source["kind"] == "checkpoint" and not Path(source["path"]).is_dir():
        skipped = f"the source checkpoint {source['path']} is not here"
    if skipped:
        return [ours], skipped
    with context.Pool(1) as pool:
        theirs, reference = pool.apply(_vision_pytorch, (str(bundle), batch, repeats))
    name = next(iter(our_outputs))
    agreement = compare_output(name, our_outputs[name], reference[name], thresholds_for(manifest["precision"]))
    ours.cosine_vs_pytorch = agreement.cosine
    return [ours, VisionFigures(**theirs)], None
