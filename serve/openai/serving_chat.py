"""The serving logic of chat completions, as vLLM's ``serving_chat`` holds it: admission, the
generation thread, and the response models each request becomes; the routes only call it.

Requests run one at a time, in arrival order, on a single worker thread (the runtime's decoder
holds one sequence: onnxruntime-genai's batching Engine cannot take our spliced embeddings,
docs/language-model.md). Each job streams events back to its request's event loop; a client that
disconnects, a stop string or the request's deadline ends the generation at the next token.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from ccra_export.core.errors import CCRAExportError
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.serve.openai.conversations import ConversationStore, history_key
from ccra_export.serve.openai.image_urls import ImageLimits, load_image_url
from ccra_export.serve.openai.metrics import Metrics
from ccra_export.serve.openai.protocol import (
    ApiError,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatRequest,
    DeltaMessage,
    ModelCard,
    ModelList,
    OpenAIBaseModel,
    UsageInfo,
    refused,
)

DEFAULT_MAX_TOKENS = 512
LOG = logging.getLogger("ccra_export.serve")
#: seconds between checks that a client still waits for its answer
DISCONNECT_POLL_S = 0.5
SSE_DONE = b"data: [DONE]\n\n"

#: ``await disconnected()``: the client went away (Starlette's ``Request.is_disconnected``)
Disconnected = Callable[[], Awaitable[bool]]


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


@dataclass(frozen=True)
class Text:
    """A piece of the answer, sent as soon as it cannot be the start of a stop string."""

    piece: str


@dataclass(frozen=True)
class Failed:
    error: ApiError


@dataclass(frozen=True)
class Done:
    """The end: ``usage`` is None when the generation was cancelled (nobody is listening)."""

    finish_reason: str
    usage: UsageInfo | None


Event = Text | Failed | Done


@dataclass
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event]
    deadline: float
    arrived: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def emit(self, event: Event) -> None:
        """From the generation thread: hand ``event`` to the request's event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    """Runs jobs on the generation thread; owns the pipeline and the held conversations."""

    def __init__(self, pipeline: Pipeline, limits: ImageLimits, store: ConversationStore, metrics: Metrics) -> None:
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
            job.emit(Done(stop.args[0], None))
        except ApiError as exc:
            job.emit(Failed(exc))
        except CCRAExportError as exc:  # input the runtime refused: one line, the client's fault
            job.emit(Failed(refused(exc, len(job.request.messages))))
        except Exception as exc:  # the log keeps the traceback; the client gets one line
            LOG.exception("generation failed")
            job.emit(Failed(ApiError(500, f"internal error ({type(exc).__name__})")))

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
                job.emit(Text(piece))

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
            usage = UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
            job.emit(Done("stop", usage))
            return  # a stop string cut the answer: the cache holds more than the client saw, so it is not kept
        send(held[0])  # the answer ended without completing a stop string
        if first:
            self.metrics.ttft.observe(first[0] - job.arrived)
        generated = reply.generation.tokens
        ended = bool(generated) and generated[-1] in sampling.stop_ids
        completion = len(generated) - int(ended)
        prompt = context_before + reply.prompt_tokens  # the whole conversation, image tokens included
        usage = UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        self.store.put(history_key(digest, [*parsed.turns, (parsed.question, "".join(text).strip())]), conversation)
        self.metrics.held_bytes.set(self.store.stats()["bytes"])
        self.metrics.completion_tokens.inc(completion)
        if reply.generation.decode_s > 0 and completion > 1:
            self.metrics.tokens_per_second.observe((completion - 1) / reply.generation.decode_s)
        job.emit(Done("stop" if ended else "length", usage))


def sse(model: OpenAIBaseModel) -> bytes:
    """One server-sent event carrying ``model``'s JSON."""
    return f"data: {model.model_dump_json()}\n\n".encode()


class OpenAIServingChat:
    """Chat completions behind the routes: admission (the served name, readiness, the bounded
    queue), the one generation thread, and the protocol models a finished or streamed job
    becomes. It knows no routes or HTTP responses: the router turns what it returns into those."""

    def __init__(
        self,
        worker: Worker,
        metrics: Metrics,
        *,
        model_name: str,
        max_queue: int,
        request_timeout_s: float,
        ready: bool = False,
    ) -> None:
        self.worker, self.metrics = worker, metrics
        self.model_name, self.max_queue, self.request_timeout_s = model_name, max_queue, request_timeout_s
        self.ready = ready
        self.in_flight = 0  # queued or generating
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccra-generate")  # one decoder, FIFO

    def warm_up(self) -> None:
        """Run the whole path once; only then does /health say ready and a chat get served."""
        self.worker.warm_up()
        self.ready = True

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name)])

    def submit(self, request: ChatRequest) -> Job:
        """Queue ``request`` on the generation thread, or refuse it: a model not served here (404),
        the warm-up not done (503), the queue full (429 with Retry-After, so clients back off)."""
        if request.model not in (None, self.model_name):
            raise ApiError(
                404,
                f"model {request.model!r} is not served here (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if not self.ready:
            raise ApiError(503, "the model is still loading (GET /health)")
        if self.in_flight >= self.max_queue:
            raise ApiError(
                429, f"the queue is full ({self.max_queue} requests); retry later", headers={"Retry-After": "1"}
            )
        loop = asyncio.get_running_loop()
        job = Job(request, loop, asyncio.Queue(), time.perf_counter() + self.request_timeout_s)
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        future = loop.run_in_executor(self.executor, self.worker.run, job)
        future.add_done_callback(self._finished)
        return job

    def _finished(self, _: object) -> None:
        self.in_flight -= 1
        self.metrics.queue_depth.set(self.in_flight)

    async def complete(self, job: Job, disconnected: Disconnected) -> ChatCompletionResponse | None:
        """The whole answer as one response; None when the client went away (the job is cancelled,
        counted as 499). A failed generation raises its ApiError for the router's error handler."""
        pieces: list[str] = []
        while True:
            event = await self._next_event(job, disconnected)
            match event:
                case None:
                    self.metrics.requests.labels("499").inc()
                    return None
                case Text(piece):
                    pieces.append(piece)
                case Failed(error):
                    raise error
                case Done(finish_reason, usage):
                    self.metrics.requests.labels("200").inc()
                    message = ChatMessage(content="".join(pieces))
                    choice = ChatCompletionResponseChoice(message=message, finish_reason=finish_reason)
                    return ChatCompletionResponse(
                        id=job.id, created=job.created, model=self.model_name, choices=[choice], usage=usage
                    )

    async def stream(self, job: Job, disconnected: Disconnected) -> AsyncIterator[bytes]:
        """Server-sent events: the role chunk at once (the request is queued), a chunk per piece,
        the finish chunk, the usage chunk if ``stream_options.include_usage``, then ``[DONE]``. The
        status is already 200 when a generation fails, so its error object is the last event."""
        wants_usage = job.request.stream_options is not None and job.request.stream_options.include_usage
        try:
            yield sse(self._chunk(job, DeltaMessage(role="assistant", content="")))
            while True:
                event = await self._next_event(job, disconnected)
                match event:
                    case None:
                        self.metrics.requests.labels("499").inc()
                        return
                    case Text(piece):
                        yield sse(self._chunk(job, DeltaMessage(content=piece)))
                    case Failed(error):
                        self.metrics.requests.labels(str(error.status)).inc()
                        yield sse(error.response())
                        yield SSE_DONE
                        return
                    case Done(finish_reason, usage):
                        self.metrics.requests.labels("200").inc()
                        yield sse(self._chunk(job, DeltaMessage(), finish_reason))
                        if wants_usage:
                            yield sse(self._chunk(job, None, usage=usage))
                        yield SSE_DONE
                        return
        finally:
            job.cancel.set()  # a client that went away mid-stream stops the generation at its next token

    def _chunk(
        self, job: Job, delta: DeltaMessage | None, finish_reason: str | None = None, usage: UsageInfo | None = None
    ) -> ChatCompletionStreamResponse:
        """A stream chunk of ``job``; ``delta`` None: the usage chunk, whose ``choices`` is empty."""
        choices = []
        if delta is not None:
            choices.append(ChatCompletionResponseStreamChoice(delta=delta, finish_reason=finish_reason))
        return ChatCompletionStreamResponse(
            id=job.id, created=job.created, model=self.model_name, choices=choices, usage=usage
        )

    @staticmethod
    async def _next_event(job: Job, disconnected: Disconnected) -> Event | None:
        """The job's next event; None (and the job cancelled) when the client went away."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                if await disconnected():
                    job.cancel.set()
                    return None
