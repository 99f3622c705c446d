"""Image + prompt -> text with a bundle: ``Pipeline.from_bundle(dir).generate(image, prompt)``.

LLaVA-1.5's conversation template, its tokenizer, CLIP preprocessing (identical to
transformers'), the vision graph (with CCRA's text input when the model has CCRA), the N visual
tokens spliced in place of ``<image>``, then prefill and decode. No torch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ccra_export.core.chat_template import TEMPLATE
from ccra_export.core.errors import BundleError, no_language_model
from ccra_export.core.image_preprocess import (
    ImageProcessorConfig,
    ImageReadError,
    ImageTooLargeError,
    check_pixels,
    crop_geometry,
    pixel_limit,
    preprocess,
)
from ccra_export.core.manifest import read_manifest, verify_files
from ccra_export.core.manifest_schema import Manifest
from ccra_export.runtime.attention import AttentionMap
from ccra_export.runtime.backends import bundle_backend
from ccra_export.runtime.conversation import Conversation, Decoding
from ccra_export.runtime.inputs import (
    IMAGE_TOKEN,
    InputError,
    check_prompt,
    control_tokens,
    load_image,
    overflowing,
)
from ccra_export.runtime.language_model import Generation, KVCache, LanguageModel, Sampling
from ccra_export.runtime.text_stream import TextStream
from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB, TowerCache
from ccra_export.runtime.vision_backend import VisionBackend, unloadable

LM_DIR = "lm"
#: slack on the characters-per-token bound: a normaliser may fold characters together (NFC composes
#: a letter and its accent), so the tokenizer is trusted only past this many times the bound
TEXT_BOUND_SLACK = 4

__all__ = ["IMAGE_TOKEN", "TEMPLATE", "Conversation", "InputError", "Pipeline", "Prepared", "load_image"]


@dataclass
class Prepared:
    inputs_embeds: np.ndarray
    input_ids: list[int]  # the prompt's tokens, <image> included once
    image_position: int
    visual_tokens: np.ndarray
    attention: np.ndarray | None = None  # CCRA: the LPWCA map [1, L, N] the vision graph gave, float32
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


def map_fp32(attention: np.ndarray | None) -> np.ndarray | None:
    """The LPWCA map as float32: FP16 bundles built before the map was FP32 (issue 27) give it in
    float16, mostly subnormal at llava-1.5-7b sizes; readers see one type either way."""
    return None if attention is None else np.asarray(attention, dtype=np.float32)


def outputs_attention_map(manifest: Manifest) -> bool:
    """The vision graph outputs CCRA's LPWCA map (a plain bundle, or a plug-in module, may not)."""
    return any(output["name"] == "lpwca_attention" for output in manifest["graph"]["outputs"])


def visual_token_count(manifest: Manifest) -> int:
    """Visual tokens per image: the vision graph's ``visual_tokens`` output length, else one per patch."""
    for output in manifest["graph"]["outputs"]:
        if output["name"] == "visual_tokens" and len(output["shape"]) == 3 and isinstance(output["shape"][1], int):
            return int(output["shape"][1])
    vision = manifest["model"]["vision"]
    return (int(vision["image_size"]) // int(vision["patch_size"])) ** 2


def processor_from_manifest(manifest: Manifest) -> ImageProcessorConfig:
    """The checkpoint's image processor as recorded at build time (CLIP defaults for presets)."""
    record = manifest.get("image_processor")
    if not record:
        return ImageProcessorConfig.for_image_size(manifest["model"]["vision"]["image_size"])
    return ImageProcessorConfig(
        **{**record, "image_mean": tuple(record["image_mean"]), "image_std": tuple(record["image_std"])}
    )


class Pipeline:
    def __init__(self, bundle: Path, manifest: Manifest, vision: Any, lm: LanguageModel, tokenizer: Any) -> None:
        self.bundle, self.manifest, self.vision, self.lm, self.tokenizer = bundle, manifest, vision, lm, tokenizer
        record = manifest["language_model"]
        self.image_token_id = int(record["image_token_id"])
        self.ccra = manifest["variant"] == "ccra"
        #: the vision graph outputs CCRA's attention map (a plug-in CCRA module may not give one)
        self.has_attention = outputs_attention_map(manifest)
        self.processor = processor_from_manifest(manifest)
        self.control_tokens = control_tokens(tokenizer)
        # one image through the vision graph at a time: its intra-op threads use every core already, and
        # a server's concurrent requests would multiply its activations' memory
        self._vision_lock = threading.Lock()
        #: pixels preprocessing may hold at once (the padded square included); a server sets its own
        self.max_pixels = pixel_limit()
        #: the visual tokens that replace <image> in the decoder's input
        self.visual_token_count = visual_token_count(manifest)
        longest = max((len(token) for token in tokenizer.get_vocab(with_added_tokens=True)), default=1)
        #: characters beyond which no text fits the context, whatever its tokens: checked before tokenising
        self.max_text_chars = lm.context_length * max(longest, 1) * TEXT_BOUND_SLACK

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
        context: int | None = None,
    ) -> Pipeline:
        """Load a bundle. ``backend``: auto runs the bundle's TensorRT engine where TensorRT is usable,
        else ONNX Runtime; ``vision`` passes a backend opened elsewhere instead. The language model
        runs on the device it was built for (``lm_device`` overrides it, e.g. ``"cpu"`` to check a
        CUDA-built decoder on a workstation). ``verify`` re-hashes every file (seconds per GB).
        A split bundle (``build --split-vision``) keeps up to ``tower_cache_mib`` MiB of tower
        outputs, so a second question about an image runs only CCRA's head (0 disables it).
        ``context``: tokens a conversation may hold, at most the bundle's (smaller KV caches)."""
        from tokenizers import Tokenizer

        bundle = Path(bundle)
        manifest = read_manifest(bundle)
        if not manifest.get("language_model"):
            raise no_language_model(bundle)
        if verify:
            verify_files(bundle, manifest)
        if vision is None:
            vision, _ = bundle_backend(bundle, manifest, backend, tower_cache=TowerCache.from_mib(tower_cache_mib))
        lm = LanguageModel(bundle / LM_DIR, lm_device or manifest["language_model"].get("device", "cpu"), context)
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

    def chat(self, cache: KVCache | None = None, engine: Decoding | None = None) -> Conversation:
        """A multi-turn conversation about one image (the KV cache is kept between turns); a server
        passes a slot of its KV pool and its batcher (``Conversation``)."""
        return Conversation(self, cache, engine)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` inside a conversation (no beginning-of-sequence token)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def check_text_length(self, length: int, field: str) -> None:
        """Refuse ``length`` characters of text that no tokenisation fits in the context (no token
        spells more than the vocabulary's longest entry): a bound checked before tokenising, so a
        megabyte of text costs a comparison, not a tokenizer run."""
        if length > self.max_text_chars:
            raise InputError(
                f"{length} characters of text cannot fit the context of {self.lm.context_length} tokens",
                field=field,
            )

    def check_image(self, image: Image.Image, source: str | Path | None = None) -> None:
        """Refuse, before any pixel is touched, a picture whose preprocessing would hold over
        ``max_pixels`` (the square LLaVA-1.5 pads it to included); ``source`` names it."""
        try:
            check_pixels(image.size, self.processor, self.max_pixels)
        except ImageTooLargeError as exc:
            raise InputError(exc.problem, field="image", value=source) from None

    def prompt_ids(self, prompt: str) -> list[int]:
        """The first turn's tokens (LLaVA-1.5's template, ``<image>`` once), tokenised only."""
        check_prompt(prompt, self.control_tokens)
        self.check_text_length(len(prompt), "prompt")
        ids = self.tokenizer.encode(TEMPLATE.format(prompt=prompt.strip())).ids
        if ids.count(self.image_token_id) != 1:
            raise BundleError(f"tokenizer: {IMAGE_TOKEN} must encode to token {self.image_token_id} exactly once")
        return ids

    def _vision(self, image: Image.Image, prompt: str) -> dict[str, np.ndarray]:
        """The vision graph on one image (and, with CCRA, the instruction's token embeddings)."""
        try:
            pixels = preprocess(image, self.processor, self.max_pixels)
        except ImageReadError as exc:  # ImageTooLargeError: the picture or its padded square over max_pixels
            raise InputError(exc.problem, field="image") from None
        feeds = {"pixel_values": pixels[None]}
        if self.ccra:  # CCRA's text input: the instruction's own token embeddings
            instruction = self.encode_text(prompt.strip()) or [0]
            feeds["text_embeds"] = self.lm.embed(instruction).astype(np.float32)
            feeds["text_mask"] = np.ones((1, len(instruction)), np.int64)
        return self.vision.run(feeds)

    def prepare(self, image: Image.Image, prompt: str, ids: list[int] | None = None) -> Prepared:
        """The first turn's decoder input: ``ids`` (``prompt_ids(prompt)``, tokenised here when not
        given) with the image's visual tokens in place of ``<image>``."""
        if ids is None:
            ids = self.prompt_ids(prompt)
        start = time.perf_counter()
        with self._vision_lock:
            outputs = self._vision(image, prompt)
        vision_s = time.perf_counter() - start
        visual = outputs["visual_tokens"].astype(self.lm.embeds_dtype)
        position = ids.index(self.image_token_id)
        parts = [self.lm.embed(ids[:position]), visual, self.lm.embed(ids[position + 1 :])]
        embeds = np.concatenate([p for p in parts if p.shape[1]], axis=1)
        return Prepared(embeds, ids, position, visual, map_fp32(outputs.get("lpwca_attention")), image.size, vision_s)

    def attention(self, image: Image.Image | str | Path, prompt: str) -> AttentionMap:
        """CCRA's LPWCA map for ``prompt`` about ``image``, with the geometry that puts each patch on
        the photo (the vision graph only; no text is generated)."""
        check_prompt(prompt, self.control_tokens)
        self.check_text_length(len(prompt), "prompt")
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
        ids = self.prompt_ids(prompt)
        length = len(ids) - 1 + self.visual_token_count
        if length + sampling.max_new_tokens > self.lm.context_length:  # from the token count: no vision yet
            raise InputError(
                f"{length} prompt tokens (with {self.visual_token_count} image tokens) + "
                f"{sampling.max_new_tokens} new tokens exceed the context of {self.lm.context_length}",
                field=overflowing(length, self.lm.context_length),
            )
        prepared = self.prepare(picture, prompt, ids)
        text_stream = TextStream(self.tokenizer)

        def stream(token: int) -> None:
            if on_text is not None and token not in sampling.stop_ids and (piece := text_stream.push(token)):
                on_text(piece)

        generation = self.lm.generate(prepared.inputs_embeds, sampling, stream)
        if on_text is not None and (rest := text_stream.flush()):
            on_text(rest)
        answer = [t for t in generation.tokens if t not in sampling.stop_ids]
        return self.tokenizer.decode(answer), generation, prepared
