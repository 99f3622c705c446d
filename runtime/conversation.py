"""A multi-turn conversation about one image, with the KV cache kept between turns.

LLaVA-1.5's template (vicuna_v1, as llava-hf's chat template writes it)::

    USER: <image>\\n{question 1} ASSISTANT: {answer 1}</s>USER: {question 2} ASSISTANT: ...

The first turn carries the image; its visual tokens (conditioned by CCRA on the first question)
stay in the cache, so a follow-up prefills only the end of the previous answer, ``</s>`` and its
own ``USER: ... ASSISTANT:`` tokens. A second image is refused: LLaVA-1.5 was trained with one
image at the start of a conversation, and its answers about a second one are not defined; start
a new conversation for a new image. ``token_ids`` is the whole conversation as one sequence (the
image as a single ``<image>`` token), for checking a turn against a model given all of it.

Every turn is tokenised and its length checked against the context before any embedding or
vision work (a megabyte of prompt is refused in milliseconds, not after the vision graph ran on
it); ``conversation_tokens`` counts a whole history the same way without running anything. A
conversation is one sequence: ``ask`` and ``replay`` hold its lock, so two threads sharing one
take turns instead of interleaving their tokens in one KV cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ccra_export.core.chat_template import EOS_TOKEN, FOLLOW_UP
from ccra_export.runtime.inputs import InputError, check_prompt, check_text, load_image, overflowing
from ccra_export.runtime.language_model import Generation, KVCache, KVSnapshot, LanguageModel, Sampling
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
    control_tokens: frozenset[str]
    visual_token_count: int

    def prepare(self, image: Image.Image, prompt: str, ids: list[int] | None = None) -> Prepared: ...

    def encode_text(self, text: str) -> list[int]: ...

    def prompt_ids(self, prompt: str) -> list[int]: ...

    def check_text_length(self, length: int, field: str) -> None: ...


#: a history's answer -> the token ids the model generated for it, when the caller kept them
AnswerIds = Callable[[str], "Sequence[int] | None"]


def _answer_ids(pipeline: ChatModel, answer: str, known: AnswerIds | None) -> list[int]:
    """The answer's tokens: the ids the model generated for exactly this text when ``known``
    has them (re-tokenising text that holds U+FFFD, or any text the model split unusually,
    gives other tokens), else its tokenisation."""
    answer = answer.strip()
    ids = known(answer) if known is not None else None
    if ids is not None:
        return list(ids)
    pipeline.check_text_length(len(answer), "history")
    return pipeline.encode_text(answer)


def follow_up_ids(pipeline: ChatModel, prompt: str) -> list[int]:
    """A later turn's own tokens, after the previous answer and its ``</s>``."""
    check_prompt(prompt, pipeline.control_tokens)
    pipeline.check_text_length(len(prompt), "prompt")
    return pipeline.encode_text(FOLLOW_UP.format(prompt=prompt.strip()))


def conversation_tokens(
    pipeline: ChatModel, turns: Sequence[tuple[str, str]], question: str, known: AnswerIds | None = None
) -> int:
    """Prompt tokens a conversation of ``turns`` [(question, answer), ...] then ``question`` feeds
    the decoder, exactly as ``replay`` then ``ask`` would (the image's visual tokens included),
    counted by the tokenizer alone: no embedding, no vision. The characters are bounded first, so
    a text no context could hold is refused before it is tokenised."""
    texts = [text for turn in turns for text in turn] + [question]
    pipeline.check_text_length(sum(len(text) for text in texts), "history" if turns else "prompt")
    total = 0
    for index, (asked, answer) in enumerate([*turns, (question, None)]):
        if index == 0:
            total += len(pipeline.prompt_ids(asked)) - 1 + pipeline.visual_token_count
        else:
            total += 1 + len(follow_up_ids(pipeline, asked))  # </s> closing the previous answer
        if answer is not None:
            check_text(answer, pipeline.control_tokens, "answer")
            total += len(_answer_ids(pipeline, answer, known))
    return total


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


class Decoding(Protocol):
    """Who runs the decoder for a conversation: the language model itself (one sequence at a
    time), or a ``ContinuousBatcher`` (many sequences, one decoder call per step)."""

    def prefill(self, cache: KVCache, inputs_embeds: np.ndarray) -> np.ndarray: ...

    def decode(
        self,
        cache: KVCache,
        inputs_embeds: np.ndarray,
        sampling: Sampling,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation: ...


class Conversation:
    """``ask`` a question (with the image on the first turn), get the answer; repeat.

    ``cache``: where its keys and values live (a server passes a slot of its pool; by default a
    cache of its own for the language model's context); ``engine``: who runs the decoder (by
    default the language model, one sequence; a server passes its batcher). ``close`` gives the
    cache's slot back."""

    def __init__(self, pipeline: ChatModel, cache: KVCache | None = None, engine: Decoding | None = None) -> None:
        self.pipeline = pipeline
        self.cache = cache if cache is not None else pipeline.lm.new_cache()
        self.engine: Decoding = engine if engine is not None else pipeline.lm
        self.token_ids: list[int] = []  # the whole conversation, <image> as one token
        self.turns = 0
        self.last_prompt_tokens = 0
        self._pending: list[int] = []  # chosen but not yet fed to the decoder (end of the last answer)
        eos = pipeline.tokenizer.token_to_id(EOS_TOKEN)
        self._eos = eos if eos is not None else min(pipeline.lm.eos_ids, default=0)
        self._lock = threading.Lock()  # one sequence: a second thread waits for the turn in progress
        self._saved: KVSnapshot | None = None  # suspended: the cached tokens, out of the pool

    def close(self) -> None:
        """Give the KV cache's slot back and drop what was saved; the conversation cannot continue."""
        self.cache.release()
        self._saved = None

    @property
    def suspended(self) -> bool:
        return self._saved is not None

    @property
    def held_bytes(self) -> int:
        """Bytes a suspended conversation holds (its cached tokens, not a whole context)."""
        return self._saved.nbytes if self._saved is not None else self.cache.nbytes

    def suspend(self) -> None:
        """Between turns: copy the cached tokens out of the KV pool and give the slot back (a server
        holds many conversations in the memory of their tokens, not of a slot each)."""
        with self._lock:
            if self._saved is None:
                self._saved = self.cache.pool.save(self.cache)
                self.cache.release()

    def resume(self, cache: KVCache) -> None:
        """Continue in ``cache`` (an empty slot of the same pool): the saved tokens go back in."""
        with self._lock:
            if self._saved is None:
                raise ValueError("the conversation is not suspended")
            cache.pool.restore(self._saved, cache)
            self.cache, self._saved = cache, None

    @property
    def eos_id(self) -> int:
        """The token that closes an answer before the next turn (``</s>``)."""
        return self._eos

    @property
    def tokens_used(self) -> int:
        """Context the conversation occupies: cached tokens plus the answer's last, unfed token."""
        cached = self._saved.length if self._saved is not None else self.cache.length
        return cached + len(self._pending)

    def _turn_ids(self, prompt: str, image: Image.Image | str | Path | None) -> tuple[list[int], int]:
        """This turn's prompt tokens (the first turn's with ``<image>`` once) and how many the
        decoder will be fed (the image's visual tokens in place of ``<image>``): tokenised only."""
        pipeline = self.pipeline
        if self.turns == 0:
            if image is None:
                raise InputError("the first turn of a conversation needs the image", field="image")
            ids = pipeline.prompt_ids(prompt)
            return ids, len(ids) - 1 + pipeline.visual_token_count
        if image is not None:
            raise InputError(
                "a conversation has one image, given in its first turn (LLaVA-1.5 was trained so); "
                "start a new conversation for a new image",
                field="image",
            )
        closing = self._pending if self._pending[-1:] == [self._eos] else [*self._pending, self._eos]
        ids = [*closing, *follow_up_ids(pipeline, prompt)]
        return ids, len(ids)

    def _turn(self, prompt: str, image: Image.Image | str | Path | None, ids: list[int]) -> _Turn:
        """This turn's prompt as the decoder will be fed it: the first turn with the image
        spliced in, a later one after the end of the previous answer and ``</s>``."""
        pipeline = self.pipeline
        if self.turns == 0:
            picture = image if isinstance(image, Image.Image) else load_image(image)
            prepared = pipeline.prepare(picture, prompt, ids)
            return _Turn(
                prepared.inputs_embeds,
                prepared.input_ids,
                prepared.visual_tokens.shape[1],
                prepared.attention,
                getattr(prepared, "vision_s", 0.0),
            )
        return _Turn(pipeline.lm.embed(ids), ids, 0, None)

    def _record(self, fed_ids: list[int], new_tokens: list[int]) -> None:
        self.token_ids += [*fed_ids[len(self._pending) :], *new_tokens]  # pending tokens are recorded already
        self.turns += 1

    def replay(
        self,
        prompt: str,
        answer: str,
        image: Image.Image | str | Path | None = None,
        answer_ids: Sequence[int] | None = None,
    ) -> None:
        """Feed a turn whose answer is already known (a client's history): its question and the
        given answer go into the cache without sampling, so the next ``ask`` continues after it.
        ``answer_ids``: the tokens the model generated for ``answer`` (a server keeps them), fed
        as they are, so the cache is the one the conversation had when it was asked; else the
        answer is tokenised. The length is checked before any embedding or vision work."""
        with self._lock:
            ids, fed = self._turn_ids(prompt, image)
            check_text(answer, self.pipeline.control_tokens, "answer")
            known = list(answer_ids) if answer_ids is not None else None
            answer_tokens = _answer_ids(self.pipeline, answer, None if known is None else lambda _: known)
            if self.cache.length + fed + len(answer_tokens) + 1 > self.cache.capacity:
                raise InputError(
                    f"the conversation exceeds the context of {self.cache.capacity} tokens", field="history"
                )
            turn = self._turn(prompt, image, ids)
            embeds = turn.embeds
            if answer_tokens:
                embeds = np.concatenate([embeds, self.pipeline.lm.embed(answer_tokens)], axis=1)
            self.engine.prefill(self.cache, embeds)
            self._record(turn.ids, answer_tokens)
            self._pending = []

    def ask(
        self,
        prompt: str,
        image: Image.Image | str | Path | None = None,
        sampling: Sampling | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Reply:
        with self._lock:
            return self._ask(prompt, image, sampling, on_text)

    def _ask(
        self,
        prompt: str,
        image: Image.Image | str | Path | None,
        sampling: Sampling | None,
        on_text: Callable[[str], None] | None,
    ) -> Reply:
        pipeline = self.pipeline
        sampling = sampling or Sampling(stop_ids=pipeline.lm.eos_ids)
        ids, fed = self._turn_ids(prompt, image)
        needed = self.cache.length + fed + sampling.max_new_tokens
        if needed > self.cache.capacity:  # refused from the token count, before any embedding or vision
            raise InputError(
                f"the conversation holds {self.cache.length} tokens; this turn's {fed} prompt "
                f"tokens + {sampling.max_new_tokens} new tokens exceed the context of {self.cache.capacity}: "
                "start a new conversation or ask for fewer new tokens",
                field=overflowing(self.cache.length + fed, self.cache.capacity),
            )
        turn = self._turn(prompt, image, ids)
        embeds, ids, visual, attention = turn.embeds, turn.ids, turn.visual_tokens, turn.attention
        self.last_prompt_tokens = int(embeds.shape[1])  # known even if the caller stops the decode early
        stream = TextStream(pipeline.tokenizer)

        def emit(token: int) -> None:
            if on_text is not None and token not in sampling.stop_ids and (piece := stream.push(token)):
                on_text(piece)

        generation = self.engine.decode(self.cache, embeds, sampling, emit)
        if on_text is not None and (rest := stream.flush()):
            on_text(rest)
        self._record(ids, generation.tokens)
        self._pending = generation.tokens[-1:]
        answer = [t for t in generation.tokens if t not in sampling.stop_ids]
        return Reply(
            pipeline.tokenizer.decode(answer), generation, int(embeds.shape[1]), visual, attention, turn.vision_s
        )
