"""Image + prompt -> text with a bundle: ``Pipeline.from_bundle(dir).generate(image, prompt)``.

LLaVA-1.5's conversation template, its tokenizer, CLIP preprocessing (identical to
transformers'), the vision graph (with CCRA's text input when the model has CCRA), the N visual
tokens spliced in place of ``<image>``, then prefill and decode. No torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ccra_export.core.chat_template import TEMPLATE
from ccra_export.core.errors import BundleError, no_language_model
from ccra_export.core.image_preprocess import ImageProcessorConfig, crop_geometry, preprocess
from ccra_export.core.manifest import read_manifest, verify_files
from ccra_export.runtime.attention import AttentionMap
from ccra_export.runtime.backends import bundle_backend
from ccra_export.runtime.conversation import Conversation
from ccra_export.runtime.inputs import (
    IMAGE_TOKEN,
    InputError,
    check_prompt,
    control_tokens,
    load_image,
    overflowing,
)
from ccra_export.runtime.language_model import Generation, LanguageModel, Sampling
from ccra_export.runtime.text_stream import TextStream
from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB, TowerCache
from ccra_export.runtime.vision_backend import VisionBackend, unloadable

LM_DIR = "lm"

__all__ = ["IMAGE_TOKEN", "TEMPLATE", "Conversation", "InputError", "Pipeline", "Prepared", "load_image"]


@dataclass
class Prepared:
    inputs_embeds: np.ndarray
    input_ids: list[int]  # the prompt's tokens, <image> included once
    image_position: int
    visual_tokens: np.ndarray
    attention: np.ndarray | None = None  # CCRA: the LPWCA map [1, L, N] the vision graph gave
    image_size: tuple[int, int] | None = None
    vision_s: float = 0.0  # preprocessing + the vision graph(s): a split bundle's cached tower makes it small


def no_attention_map(bundle: Path) -> InputError:
    """This model has no map to show: the refusal every verb that draws one gives."""
    return InputError(
        "its vision graph outputs no attention map (the plain LLaVA-1.5 variant, or a plug-in CCRA module "
        "that returns none; the reconstruction outputs lpwca_attention)",
        field="bundle",
        value=bundle,
    )


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
        #: the vision graph outputs CCRA's attention map (a plug-in CCRA module may not give one)
        self.has_attention = any(o["name"] == "lpwca_attention" for o in manifest["graph"]["outputs"])
        self.processor = processor_from_manifest(manifest)
        self.control_tokens = control_tokens(tokenizer)

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        backend: str = "auto",
        verify: bool = False,
        *,
        vision: VisionBackend | None = None,
        lm_device: str | None = None,
        tower_cache_mib: float = DEFAULT_TOWER_CACHE_MIB,
    ) -> Pipeline:
        """Load a bundle. ``backend``: auto runs the bundle's TensorRT engine where TensorRT is usable,
        else ONNX Runtime; ``vision`` passes a backend opened elsewhere instead. The language model
        runs on the device it was built for (``lm_device`` overrides it, e.g. ``"cpu"`` to check a
        CUDA-built decoder on a workstation). ``verify`` re-hashes every file (seconds per GB).
        A split bundle (``build --split-vision``) keeps up to ``tower_cache_mib`` MiB of tower
        outputs, so a second question about an image runs only CCRA's head (0 disables it)."""
        from tokenizers import Tokenizer

        bundle = Path(bundle)
        manifest = read_manifest(bundle)
        if not manifest.get("language_model"):
            raise no_language_model(bundle)
        if verify:
            verify_files(bundle, manifest)
        if vision is None:
            vision, _ = bundle_backend(bundle, manifest, backend, tower_cache=TowerCache.from_mib(tower_cache_mib))
        lm = LanguageModel(bundle / LM_DIR, lm_device or manifest["language_model"].get("device", "cpu"))
        tokenizer_path = bundle / LM_DIR / "decoder" / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises plain Exception for a corrupt file
            raise BundleError(unloadable(tokenizer_path, exc)) from None
        return cls(bundle, manifest, vision, lm, tokenizer)

    @property
    def tower_cache(self) -> TowerCache | None:
        """A split bundle's cache of tower outputs (hits, misses and bytes in ``.stats()``); else None."""
        return getattr(self.vision, "cache", None)

    def chat(self) -> Conversation:
        """A multi-turn conversation about one image (the KV cache is kept between turns)."""
        return Conversation(self)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` inside a conversation (no beginning-of-sequence token)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _vision(self, image: Image.Image, prompt: str) -> dict[str, np.ndarray]:
        """The vision graph on one image (and, with CCRA, the instruction's token embeddings)."""
        feeds = {"pixel_values": preprocess(image, self.processor)[None]}
        if self.ccra:  # CCRA's text input: the instruction's own token embeddings
            instruction = self.encode_text(prompt.strip()) or [0]
            feeds["text_embeds"] = self.lm.embed(instruction).astype(np.float32)
            feeds["text_mask"] = np.ones((1, len(instruction)), np.int64)
        return self.vision.run(feeds)

    def prepare(self, image: Image.Image, prompt: str) -> Prepared:
        check_prompt(prompt, self.control_tokens)
        ids = self.tokenizer.encode(TEMPLATE.format(prompt=prompt.strip())).ids
        if ids.count(self.image_token_id) != 1:
            raise BundleError(f"tokenizer: {IMAGE_TOKEN} must encode to token {self.image_token_id} exactly once")
        start = time.perf_counter()
        outputs = self._vision(image, prompt)
        vision_s = time.perf_counter() - start
        visual = outputs["visual_tokens"].astype(self.lm.embeds_dtype)
        position = ids.index(self.image_token_id)
        parts = [self.lm.embed(ids[:position]), visual, self.lm.embed(ids[position + 1 :])]
        embeds = np.concatenate([p for p in parts if p.shape[1]], axis=1)
        return Prepared(embeds, ids, position, visual, outputs.get("lpwca_attention"), image.size, vision_s)

    def attention(self, image: Image.Image | str | Path, prompt: str) -> AttentionMap:
        """CCRA's LPWCA map for ``prompt`` about ``image``, with the geometry that puts each patch on
        the photo (the vision graph only; no text is generated)."""
        check_prompt(prompt, self.control_tokens)
        picture = image if isinstance(image, Image.Image) else load_image(image)
        if not self.has_attention:
            raise no_attention_map(self.bundle)
        return self.attention_map(self._vision(picture, prompt)["lpwca_attention"][0], picture.size)

    def attention_map(self, attention: np.ndarray, image_size: tuple[int, int]) -> AttentionMap:
        """One image's ``lpwca_attention`` [L, N] as an ``AttentionMap`` of a photo of ``image_size``."""
        layers = tuple(self.manifest["model"]["ccra"]["feature_layers"])
        return AttentionMap.from_output(np.asarray(attention), layers, crop_geometry(image_size, self.processor))

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
                f"{length} prompt tokens (with {prepared.visual_tokens.shape[1]} image tokens) + "
                f"{sampling.max_new_tokens} new tokens exceed the context of {self.lm.context_length}",
                field=overflowing(length, self.lm.context_length),
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
