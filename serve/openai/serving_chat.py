"""One chat completion, from validated messages to streamed text, on the generation thread.

Requests run one at a time, in arrival order, on a single worker thread (the runtime's decoder
holds one sequence: onnxruntime-genai's batching Engine cannot take our spliced embeddings,
docs/language-model.md). Each job streams events back to its request's event loop; a client that disconnects, a
stop string or the request's deadline ends the generation at the next token.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ccra_export.core.errors import CCRAExportError
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.serve.openai.conversations import ConversationStore, history_key
from ccra_export.serve.openai.image_urls import ImageLimits, load_image_url
from ccra_export.serve.openai.protocol import ApiError, ChatRequest, refused

DEFAULT_MAX_TOKENS = 512
LOG = logging.getLogger("ccra_export.serve")


class Stopped(Exception):
    """Raised inside the decode loop to end a generation early (the reason is ``args[0]``)."""


@dataclass
class Parsed:
    """A request's conversation: completed (question, answer) turns, then the new question."""

    turns: list[tuple[str, str]]
    question: str
    image_url: str


def parse_messages(request: ChatRequest) -> Parsed:
    """LLaVA-1.5's shape of a chat: user/assistant turns, one image in the first user message.

    System messages are accepted and not used: LLaVA-1.5's template (llava-hf's chat template) has
    no system prompt, and many clients send one by default.
    """
    messages = [m for m in request.messages if m.role != "system"]
    if not messages or messages[-1].role != "user":
        raise ApiError(400, "messages: the last message must be the user's question", param="messages")
    turns: list[tuple[str, str]] = []
    image_url = None
    pending: str | None = None
    for index, message in enumerate(messages):
        images = message.images()
        if images and (message.role != "user" or index != 0 or len(images) > 1):
            raise ApiError(
                400,
                "messages: one image, in the first user message (LLaVA-1.5 was trained so); start a new "
                "conversation for a new image",
                param=f"messages[{index}].content",
            )
        if images:
            image_url = images[0].url
        expected = "user" if pending is None else "assistant"
        if message.role != expected:
            raise ApiError(400, f"messages[{index}]: expected a {expected} message", param=f"messages[{index}].role")
        text = message.text().strip()
        if message.role == "user":
            if not text:
                raise ApiError(400, f"messages[{index}]: the question is empty", param=f"messages[{index}].content")
            pending = text
        else:
            turns.append((pending, text))
            pending = None
    if image_url is None:
        raise ApiError(400, "messages: the first user message needs an image_url part", param="messages[0].content")
    return Parsed(turns, pending, image_url)


@dataclass
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    deadline: float
    arrived: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    """Runs jobs on the generation thread; owns the pipeline and the held conversations."""

    def __init__(self, pipeline: Pipeline, limits: ImageLimits, store: ConversationStore, metrics: Any) -> None:
        self.pipeline, self.limits, self.store, self.metrics = pipeline, limits, store, metrics

    def warm_up(self) -> None:
        """One tiny generation: the server reports ready only after the whole path has run once."""
        image = Image.new("RGB", (64, 48), (128, 128, 128))
        self.pipeline.chat().ask("Describe the image.", image, Sampling(max_new_tokens=2))

    def run(self, job: Job) -> None:
        try:
            if job.cancel.is_set():  # the client left while the request waited in the queue
                self.metrics.cancelled.labels("cancelled").inc()
                raise Stopped("cancelled")
            self._run(job)
        except Stopped as stop:
            job.emit("done", stop.args[0], None)
        except ApiError as exc:
            job.emit("error", exc)
        except CCRAExportError as exc:  # input the runtime refused: one line, the client's fault
            job.emit("error", refused(exc, len(job.request.messages)))
        except Exception as exc:
            import logging

            logging.getLogger("ccra_export.serve").exception("generation failed")
            job.emit("error", ApiError(500, f"internal error ({type(exc).__name__})"))

    def _run(self, job: Job) -> None:
        request, pipeline = job.request, self.pipeline
        parsed = parse_messages(request)
        stops = request.stops()
        image, data = load_image_url(parsed.image_url, self.limits)
        digest = hashlib.sha256(data).hexdigest()
        conversation = self.store.take(history_key(digest, parsed.turns)) if parsed.turns else None
        self.metrics.conversations.labels("hit" if conversation is not None else "miss").inc()
        if conversation is None:
            conversation = pipeline.chat()
            for index, (question, answer) in enumerate(parsed.turns):
                conversation.replay(question, answer, image if index == 0 else None)
        sampling = Sampling(
            max_new_tokens=request.token_budget(DEFAULT_MAX_TOKENS),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop_ids=pipeline.lm.eos_ids,
        )
        room = conversation.cache.capacity - conversation.tokens_used
        if request.max_completion_tokens is None and request.max_tokens is None:
            sampling.max_new_tokens = max(1, min(sampling.max_new_tokens, room // 2))
        text: list[str] = []  # what the client has been sent
        held: list[str] = [""]  # text that may be the start of a stop string: sent once it is not
        first: list[float] = []

        def send(piece: str) -> None:
            if piece:
                if not first:
                    first.append(time.perf_counter())
                text.append(piece)
                job.emit("text", piece)

        def on_text(piece: str) -> None:
            if job.cancel.is_set():
                raise Stopped("cancelled")
            if time.perf_counter() > job.deadline:
                raise Stopped("timeout")
            pending = held[0] + piece
            hit = min((pending.find(s) for s in stops if s in pending), default=-1)
            if hit >= 0:
                send(pending[:hit])
                raise Stopped("stop")
            keep = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
            send(pending[: len(pending) - keep])
            held[0] = pending[len(pending) - keep :]

        image_arg = image if conversation.turns == 0 else None
        context_before = conversation.cache.length
        try:
            reply = conversation.ask(parsed.question, image_arg, sampling, on_text=on_text)
        except Stopped as stop:
            reason = stop.args[0]
            if reason != "stop":
                self.metrics.cancelled.labels(reason).inc()
            if reason == "timeout":
                raise ApiError(500, "the request ran past the server's time limit", code="timeout") from None
            if reason == "cancelled":
                raise
            prompt = context_before + conversation.last_prompt_tokens
            completion = conversation.cache.length - prompt + 1  # the last chosen token is not fed yet
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            job.emit("done", "stop", usage)
            return  # a stop string cut the answer: the cache holds more than the client saw, so it is not kept
        send(held[0])  # the answer ended without completing a stop string
        if first:
            self.metrics.ttft.observe(first[0] - job.arrived)
        generated = reply.generation.tokens
        ended = bool(generated) and generated[-1] in sampling.stop_ids
        completion = len(generated) - int(ended)
        usage = {
            "prompt_tokens": context_before + reply.prompt_tokens,  # the whole conversation, image tokens included
            "completion_tokens": completion,
            "total_tokens": context_before + reply.prompt_tokens + completion,
        }
        self.store.put(history_key(digest, [*parsed.turns, (parsed.question, "".join(text).strip())]), conversation)
        self.metrics.held_bytes.set(self.store.stats()["bytes"])
        self.metrics.completion_tokens.inc(completion)
        if reply.generation.decode_s > 0 and completion > 1:
            self.metrics.tokens_per_second.observe((completion - 1) / reply.generation.decode_s)
        job.emit("done", "stop" if ended else "length", usage)
