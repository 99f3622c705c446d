"""A multi-turn conversation about one image, with the KV cache kept between turns.

LLaVA-1.5's template (vicuna_v1, as llava-hf's chat template writes it)::

    USER: <image>\\n{question 1} ASSISTANT: {answer 1}</s>USER: {question 2} ASSISTANT: ...

The first turn carries the image; its visual tokens (conditioned by CCRA on the first question)
stay in the cache, so a follow-up prefills only the end of the previous answer, ``</s>`` and its
own ``USER: ... ASSISTANT:`` tokens. A second image is refused: LLaVA-1.5 was trained with one
image at the start of a conversation, and its answers about a second one are not defined; start
a new conversation for a new image. ``token_ids`` is the whole conversation as one sequence (the
image as a single ``<image>`` token), for checking a turn against a model given all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ccra_export.core.chat_template import EOS_TOKEN, FOLLOW_UP
from ccra_export.runtime.inputs import InputError, check_prompt, check_text, load_image, overflowing
from ccra_export.runtime.language_model import Generation, LanguageModel, Sampling
from ccra_export.runtime.text_stream import TextStream


class Prepared(Protocol):
    inputs_embeds: np.ndarray
    input_ids: list[int]
    visual_tokens: np.ndarray
    attention: np.ndarray | None


class ChatModel(Protocol):
    """What a conversation needs of the image+prompt pipeline (``vlm_pipeline.Pipeline``)."""

    lm: LanguageModel
    tokenizer: Any

    def prepare(self, image: Image.Image, prompt: str) -> Prepared: ...

    def encode_text(self, text: str) -> list[int]: ...


@dataclass
class _Turn:
    embeds: np.ndarray
    ids: list[int]
    visual_tokens: int
    attention: np.ndarray | None
    vision_s: float = 0.0


@dataclass
class Reply:
    text: str
    generation: Generation
    prompt_tokens: int  # tokens this turn prefilled (the image's included on the first turn)
    visual_tokens: int  # image tokens in this turn's prefill (0 after the first turn)
    attention: np.ndarray | None = None  # first turn of a CCRA model: the LPWCA map [1, L, N]
    vision_s: float = 0.0  # first turn: preprocessing and the vision graph(s)


class Conversation:
    """``ask`` a question (with the image on the first turn), get the answer; repeat."""

    def __init__(self, pipeline: ChatModel) -> None:
        self.pipeline = pipeline
        self.cache = pipeline.lm.new_cache()
        self.token_ids: list[int] = []  # the whole conversation, <image> as one token
        self.turns = 0
        self.last_prompt_tokens = 0
        self._pending: list[int] = []  # chosen but not yet fed to the decoder (end of the last answer)
        eos = pipeline.tokenizer.token_to_id(EOS_TOKEN)
        self._eos = eos if eos is not None else min(pipeline.lm.eos_ids, default=0)

    @property
    def tokens_used(self) -> int:
        """Context the conversation occupies: cached tokens plus the answer's last, unfed token."""
        return self.cache.length + len(self._pending)

    def _turn(self, prompt: str, image: Image.Image | str | Path | None) -> _Turn:
        """This turn's prompt tokens as the decoder will be fed them: the first turn with the image
        spliced in, a later one after the end of the previous answer and ``</s>``."""
        pipeline = self.pipeline
        if self.turns == 0:
            if image is None:
                raise InputError("the first turn of a conversation needs the image", field="image")
            picture = image if isinstance(image, Image.Image) else load_image(image)
            prepared = pipeline.prepare(picture, prompt)
            return _Turn(
                prepared.inputs_embeds,
                prepared.input_ids,
                prepared.visual_tokens.shape[1],
                prepared.attention,
                getattr(prepared, "vision_s", 0.0),
            )
        if image is not None:
            raise InputError(
                "a conversation has one image, given in its first turn (LLaVA-1.5 was trained so); "
                "start a new conversation for a new image",
                field="image",
            )
        check_prompt(prompt, pipeline.control_tokens)
        closing = self._pending if self._pending[-1:] == [self._eos] else [*self._pending, self._eos]
        ids = [*closing, *pipeline.encode_text(FOLLOW_UP.format(prompt=prompt.strip()))]
        return _Turn(pipeline.lm.embed(ids), ids, 0, None)

    def _record(self, fed_ids: list[int], new_tokens: list[int]) -> None:
        self.token_ids += [*fed_ids[len(self._pending) :], *new_tokens]  # pending tokens are recorded already
        self.turns += 1

    def replay(self, prompt: str, answer: str, image: Image.Image | str | Path | None = None) -> None:
        """Feed a turn whose answer is already known (a client's history): its question and the
        given answer go into the cache without sampling, so the next ``ask`` continues after it."""
        turn = self._turn(prompt, image)
        check_text(answer, self.pipeline.control_tokens, "answer")
        answer_ids = self.pipeline.encode_text(answer.strip())
        embeds = turn.embeds
        if answer_ids:
            embeds = np.concatenate([embeds, self.pipeline.lm.embed(answer_ids)], axis=1)
        if self.cache.length + embeds.shape[1] + 1 > self.cache.capacity:
            raise InputError(f"the conversation exceeds the context of {self.cache.capacity} tokens", field="history")
        self.cache.step(embeds)
        self._record(turn.ids, answer_ids)
        self._pending = []

    def ask(
        self,
        prompt: str,
        image: Image.Image | str | Path | None = None,
        sampling: Sampling | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Reply:
        pipeline = self.pipeline
        sampling = sampling or Sampling(stop_ids=pipeline.lm.eos_ids)
        turn = self._turn(prompt, image)
        embeds, ids, visual, attention = turn.embeds, turn.ids, turn.visual_tokens, turn.attention
        needed = self.cache.length + embeds.shape[1] + sampling.max_new_tokens
        if needed > self.cache.capacity:
            raise InputError(
                f"the conversation holds {self.cache.length} tokens; this turn's {embeds.shape[1]} prompt "
                f"tokens + {sampling.max_new_tokens} new tokens exceed the context of {self.cache.capacity}: "
                "start a new conversation or ask for fewer new tokens",
                field=overflowing(self.cache.length + embeds.shape[1], self.cache.capacity),
            )
        self.last_prompt_tokens = int(embeds.shape[1])  # known even if the caller stops the decode early
        stream = TextStream(pipeline.tokenizer)

        def emit(token: int) -> None:
            if on_text is not None and token not in sampling.stop_ids and (piece := stream.push(token)):
                on_text(piece)

        generation = pipeline.lm.decode(self.cache, embeds, sampling, emit)
        if on_text is not None and (rest := stream.flush()):
            on_text(rest)
        self._record(ids, generation.tokens)
        self._pending = generation.tokens[-1:]
        answer = [t for t in generation.tokens if t not in sampling.stop_ids]
        return Reply(
            pipeline.tokenizer.decode(answer), generation, int(embeds.shape[1]), visual, attention, turn.vision_s
        )
