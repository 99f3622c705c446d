"""Image + prompt -> text with a bundle: ``Pipeline.from_bundle(dir).generate(image, prompt)``.

LLaVA-1.5's conversation template, its tokenizer, CLIP preprocessing (identical to
transformers'), the vision graph (with CCRA's text input when the model has CCRA), the N visual
tokens spliced in place of ``<image>``, then prefill and decode. No torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ccra_export.core.errors import BundleError, CCRAExportError
from ccra_export.core.image_preprocess import ImageProcessorConfig, open_rgb, preprocess
from ccra_export.core.manifest import read_manifest, verify_files
from ccra_export.runtime.backends import bundle_backend
from ccra_export.runtime.language_model import Generation, LanguageModel, Sampling
from ccra_export.runtime.text_stream import TextStream

TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"  # LLaVA-1.5 (vicuna_v1) single turn
IMAGE_TOKEN = "<image>"
LM_DIR = "lm"


class InputError(CCRAExportError):
    """An image or prompt given to `run` cannot be used."""


@dataclass
class Prepared:
    inputs_embeds: np.ndarray
    input_ids: list[int]  # the prompt's tokens, <image> included once
    image_position: int
    visual_tokens: np.ndarray


def load_image(path: str | Path) -> Image.Image:
    try:
        return open_rgb(path)
    except FileNotFoundError:
        raise InputError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"--image {path}: not a readable image ({exc})") from None


def processor_from_manifest(manifest: dict[str, Any]) -> ImageProcessorConfig:
    """The checkpoint's image processor as recorded at build time (CLIP defaults for presets)."""
    record = manifest.get("image_processor")
    if not record:
        return ImageProcessorConfig.for_image_size(manifest["model"]["vision"]["image_size"])
    return ImageProcessorConfig(
        **{**record, "image_mean": tuple(record["image_mean"]), "image_std": tuple(record["image_std"])}
    )


class Pipeline:
    def __init__(self, bundle: Path, manifest: dict[str, Any], vision: Any, lm: LanguageModel, tokenizer: Any) -> None:
        self.bundle, self.manifest, self.vision, self.lm, self.tokenizer = bundle, manifest, vision, lm, tokenizer
        record = manifest["language_model"]
        self.image_token_id = int(record["image_token_id"])
        self.ccra = manifest["variant"] == "ccra"
        self.processor = processor_from_manifest(manifest)

    @classmethod
    def from_bundle(cls, bundle: str | Path, backend: str = "auto", verify: bool = False) -> Pipeline:
        """Load a bundle. ``backend``: auto runs the bundle's TensorRT engine where TensorRT is usable,
        else ONNX Runtime. ``verify`` re-hashes every file against the manifest (seconds per GB)."""
        from tokenizers import Tokenizer

        bundle = Path(bundle)
        manifest = read_manifest(bundle)
        if not manifest.get("language_model"):
            raise BundleError(
                f"--bundle {bundle}: holds no language model; rebuild it with --lm-precision int4|int8|fp16"
            )
        if verify:
            verify_files(bundle, manifest)
        vision, _ = bundle_backend(bundle, manifest, backend)
        lm = LanguageModel(bundle / LM_DIR)
        tokenizer = Tokenizer.from_file(str(bundle / LM_DIR / "decoder" / "tokenizer.json"))
        return cls(bundle, manifest, vision, lm, tokenizer)

    def prepare(self, image: Image.Image, prompt: str) -> Prepared:
        if not prompt or not prompt.strip():
            raise InputError("--prompt: empty; ask something about the image")
        if IMAGE_TOKEN in prompt:
            raise InputError(f"--prompt: contains {IMAGE_TOKEN}; the image goes in through --image")
        ids = self.tokenizer.encode(TEMPLATE.format(prompt=prompt.strip())).ids
        if ids.count(self.image_token_id) != 1:
            raise BundleError(f"tokenizer: {IMAGE_TOKEN} must encode to token {self.image_token_id} exactly once")
        feeds = {"pixel_values": preprocess(image, self.processor)[None]}
        if self.ccra:  # CCRA's text input: the instruction's own token embeddings
            instruction = self.tokenizer.encode(prompt.strip(), add_special_tokens=False).ids or [0]
            feeds["text_embeds"] = self.lm.embed(instruction).astype(np.float32)
            feeds["text_mask"] = np.ones((1, len(instruction)), np.int64)
        visual = self.vision.run(feeds)["visual_tokens"].astype(self.lm.embeds_dtype)
        position = ids.index(self.image_token_id)
        parts = [self.lm.embed(ids[:position]), visual, self.lm.embed(ids[position + 1 :])]
        return Prepared(np.concatenate([p for p in parts if p.shape[1]], axis=1), ids, position, visual)

    def generate(
        self,
        image: Image.Image | str | Path,
        prompt: str,
        sampling: Sampling | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The model's answer; ``on_text`` receives it piece by piece as tokens arrive."""
        return self.generate_tokens(image, prompt, sampling, on_text)[0]

    def generate_tokens(
        self,
        image: Image.Image | str | Path,
        prompt: str,
        sampling: Sampling | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> tuple[str, Generation, Prepared]:
        sampling = sampling or Sampling(stop_ids=self.lm.eos_ids)
        picture = image if isinstance(image, Image.Image) else load_image(image)
        prepared = self.prepare(picture, prompt)
        length = prepared.inputs_embeds.shape[1]
        if length + sampling.max_new_tokens > self.lm.context_length:
            raise InputError(
                f"--prompt: {length} prompt tokens (with {prepared.visual_tokens.shape[1]} image tokens) + "
                f"{sampling.max_new_tokens} new tokens exceed the context of {self.lm.context_length}"
            )
        text_stream = TextStream(self.tokenizer)

        def stream(token: int) -> None:
            if on_text is not None and token not in sampling.stop_ids and (piece := text_stream.push(token)):
                on_text(piece)

        generation = self.lm.generate(prepared.inputs_embeds, sampling, stream)
        if on_text is not None and (rest := text_stream.flush()):
            on_text(rest)
        answer = [t for t in generation.tokens if t not in sampling.stop_ids]
        return self.tokenizer.decode(answer), generation, prepared
