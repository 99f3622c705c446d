"""The PyTorch FP32 answer to a question about a picture: what a bundle's answer is compared with.

The vision side is this project's PyTorch reference (the checkpoint's CLIP tower, the CCRA
module, LLaVA's projector, loaded by ``checkpoint.load_checkpoint``); the language side is
Hugging Face's own ``LlavaForConditionalGeneration`` language model and head, fed the visual
tokens where ``<image>`` stands, greedy, with its KV cache. Same template, tokenizer and
preprocessing as the runtime, so any difference is the bundle's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ccra_export.core.chat_template import EOS_TOKEN, IMAGE_TOKEN, TEMPLATE
from ccra_export.core.errors import CheckpointError
from ccra_export.core.image_preprocess import ImageProcessorConfig, preprocess
from ccra_export.model.checkpoint import load_checkpoint
from ccra_export.model.vision_model import CCRAVisionModel


@dataclass
class ReferenceAnswer:
    text: str
    tokens: list[int]  #: the generated ids, the end-of-sequence token included when it came
    first_logits: np.ndarray  #: the next-token logits after the prompt
    attention: np.ndarray | None  #: CCRA's LPWCA map [L, N] (None: the plain variant)


class ReferenceVLM:
    """``ReferenceVLM.from_checkpoint(dir).answer(image, question)``."""

    def __init__(self, vision: CCRAVisionModel, llava: torch.nn.Module, tokenizer, processor: ImageProcessorConfig):  # noqa: ANN001
        self.vision, self.llava, self.tokenizer, self.processor = (
            vision.float().eval(),
            llava.eval(),
            tokenizer,
            processor,
        )
        self.weights_sha256: str | None = None
        self.image_id = tokenizer.token_to_id(IMAGE_TOKEN)
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if self.image_id is None:
            raise CheckpointError(f"tokenizer: no {IMAGE_TOKEN} token")

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ReferenceVLM:
        from tokenizers import Tokenizer
        from transformers import LlavaForConditionalGeneration
        from transformers.utils import logging as hf_logging

        path = Path(path)
        loaded = load_checkpoint(path)
        hf_logging.disable_progress_bar()
        llava = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
        processor = ImageProcessorConfig.from_checkpoint(path, loaded.config.vision.image_size)
        reference = cls(loaded.model, llava, Tokenizer.from_file(str(path / "tokenizer.json")), processor)
        reference.weights_sha256 = loaded.weights_sha256  # what a bundle built from it recorded
        return reference

    @property
    def _lm(self) -> torch.nn.Module:
        return self.llava.model.language_model

    def _cache_of(self, step: object) -> dict[str, object]:
        """The KV cache of ``step`` as the next call takes it: transformers 5.25 renamed
        ``past_key_values`` to ``cache`` (the old name warns on every call), older releases have only it."""
        if "cache" in inspect.signature(self._lm.forward).parameters:
            return {"cache": step.cache}  # type: ignore[attr-defined]
        return {"past_key_values": step.past_key_values}  # type: ignore[attr-defined]

    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self._lm.embed_tokens.weight[ids][None]

    def _prompt(
        self, image: Image.Image, question: str
    ) -> tuple[torch.Tensor, list[int], int, int, torch.Tensor | None]:
        """The prompt's input embeddings with the visual tokens at ``<image>``: (embeds, template ids,
        the image's position, visual token count, CCRA's map or None)."""
        question = question.strip()
        pixels = torch.from_numpy(preprocess(image, self.processor)[None])
        attention = None
        if self.vision.ccra is None:
            visual = self.vision(pixels)
        else:
            instruction = self.tokenizer.encode(question, add_special_tokens=False).ids or [0]
            out = self.vision(pixels, self._embed(instruction), torch.ones(1, len(instruction), dtype=torch.long))
            visual, attention = out if isinstance(out, tuple) else (out, None)
        ids = self.tokenizer.encode(TEMPLATE.format(prompt=question)).ids
        position = ids.index(self.image_id)
        embeds = torch.cat([self._embed(ids[:position]), visual, self._embed(ids[position + 1 :])], dim=1)
        return embeds, ids, position, int(visual.shape[1]), attention

    @torch.no_grad()
    def answer(self, image: Image.Image, question: str, max_new_tokens: int = 8) -> ReferenceAnswer:
        embeds, _, _, _, attention = self._prompt(image, question)
        step = self._lm(inputs_embeds=embeds, use_cache=True)
        logits = self.llava.lm_head(step.last_hidden_state[:, -1])[0]
        first = logits.numpy().copy()
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            tokens.append(token)
            if token == self.eos_id:
                break
            step = self._lm(inputs_embeds=self._embed([token]), use_cache=True, **self._cache_of(step))
            logits = self.llava.lm_head(step.last_hidden_state[:, -1])[0]
        text = self.tokenizer.decode([t for t in tokens if t != self.eos_id])
        return ReferenceAnswer(text, tokens, first, None if attention is None else attention[0].numpy())

    @torch.no_grad()
    def prompt_embeds(self, image: Image.Image, question: str) -> tuple[np.ndarray, int, int]:
        """[1, S, D]: the prompt as the language model reads it (visual tokens at ``<image>``), with
        where the visual tokens start and how many there are."""
        embeds, _, position, count, _ = self._prompt(image, question)
        return embeds.numpy(), position, count

    @torch.no_grad()
    def teacher_forced(self, image: Image.Image, question: str, continuation: list[int]) -> np.ndarray:
        """[P, vocab] next-token logits at every text position after the image, the prompt then
        ``continuation`` fed (its last token is predicted, not fed): P = text tokens after
        ``<image>`` + len(continuation). What language-model parity compares position by position."""
        embeds, ids, position, _, _ = self._prompt(image, question)
        if continuation[:-1]:
            embeds = torch.cat([embeds, self._embed(continuation[:-1])], dim=1)
        hidden = self._lm(inputs_embeds=embeds).last_hidden_state[0]
        scored = len(ids) - position - 1 + len(continuation)  # the text after <image>, then the answer
        return self.llava.lm_head(hidden[-scored:]).numpy()
