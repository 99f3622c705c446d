"""The serving logic of chat completions, as vLLM's ``serving_chat`` holds it: admission, the
generation thread, and the response models each request becomes; the routes only call it.

Up to ``parallel`` requests generate at once, each in a slot of the server's KV pool, their tokens
decoded together by the runtime's ``ContinuousBatcher`` (one decoder call per step for all of
them; a new request's prefill joins between two steps, a finished one leaves its slot at once).
Each runs on a generation thread of its own that waits on the batcher; the rest wait in the
queue, in arrival order. Each job streams events back to its request's event loop; a client that
disconnects, a stop string or the request's deadline ends its generation at the next token,
without touching the others'.

Before a job reaches that thread, a preparation thread does everything that depends only on the
request, cheapest first: the messages' shape, the conversation's length in tokens against the
context (characters bounded before the tokenizer runs), then the image: fetched under one total
deadline and decoded one at a time within the pixel limit (the padded square included). So no
request ties up the generation thread with work that ends in a refusal, and a slow image URL
delays only its own request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from ccra_export.core.errors import BundleError, CCRAExportError
from ccra_export.runtime.batching import BatcherClosed, ContinuousBatcher
from ccra_export.runtime.conversation import Conversation, conversation_tokens
from ccra_export.runtime.inputs import InputError, overflowing
from ccra_export.runtime.language_model import KVCache, Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.serve.openai.conversations import ConversationStore, history_key
from ccra_export.serve.openai.image_urls import ImageLimits, decode_image_bytes, fetch_image_bytes
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
    image_param: str = "messages[0].content"  # where the image_url part sits in the request


def prefix_function(text: str) -> list[int]:
    """KMP's failure function: ``table[i]`` is the length of the longest proper prefix of
    ``text[: i + 1]`` that is also its suffix."""
    table = [0] * len(text)
    k = 0
    for i in range(1, len(text)):
        while k and text[i] != text[k]:
            k = table[k - 1]
        if text[i] == text[k]:
            k += 1
        table[i] = k
    return table


class StopMatcher:
    """Stop strings found in text that arrives piece by piece, in time linear in the text: one
    KMP automaton per stop string, whose state is the longest prefix of it that ends the text.
    Text is sent as soon as it cannot be the start of a stop string (``feed``), so a cut answer
    never shows a stop string's beginning; a completed stop string cuts the answer where the
    earliest-starting one begins."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self._tables = [prefix_function(stop) for stop in stops]
        self._states = [0] * len(stops)
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(the text now safe to send, whether a stop string completed in ``piece``)."""
        pending = self.held + piece
        offset = len(self.held)
        cut = None
        for index, stop in enumerate(self.stops):
            state, table = self._states[index], self._tables[index]
            for position, char in enumerate(piece, start=offset):
                while state and stop[state] != char:
                    state = table[state - 1]
                if stop[state] == char:
                    state += 1
                if state == len(stop):
                    start = position + 1 - len(stop)
                    cut = start if cut is None else min(cut, start)
                    break
            self._states[index] = state
        if cut is not None:
            self.held = ""
            return pending[:cut], True
        keep = max(self._states, default=0)
        self.held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], False


def parse_messages(request: ChatRequest) -> Parsed:
    """LLaVA-1.5's shape of a chat: user/assistant turns, one image in the first user message.

    System messages are accepted and not used: LLaVA-1.5's template (llava-hf's chat template) has
    no system prompt, and many clients send one by default. Refusals name the request's own
    indices (a system message counts).
    """
    messages = [(index, m) for index, m in enumerate(request.messages) if m.role != "system"]
    if not messages or messages[-1][1].role != "user":
        raise ApiError(400, "messages: the last message must be the user's question", param="messages")
    turns: list[tuple[str, str]] = []
    image_url = None
    image_param = "messages[0].content"
    pending: str | None = None
    for position, (index, message) in enumerate(messages):
        images = message.images()
        if images and (message.role != "user" or position != 0 or len(images) > 1):
            raise ApiError(
                400,
                "messages: one image, in the first user message (LLaVA-1.5 was trained so); start a new "
                "conversation for a new image",
                param=f"messages[{index}].content",
            )
        if images:
            image_url = images[0].url
            part = next(i for i, p in enumerate(message.content or []) if getattr(p, "image_url", None) is images[0])
            image_param = f"messages[{index}].content[{part}].image_url"
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
    return Parsed(turns, pending, image_url, image_param)


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
class Inputs:
    """What the preparation thread hands the generation thread: a request checked and its image
    decoded, so the generation thread does only the model's work."""

    parsed: Parsed
    stops: list[str]
    image: Image.Image
    digest: str  # the encoded image's hash: with the history, the key of a held conversation


@dataclass
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event]
    deadline: float
    arrived: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None  # the KV slot it generated in (the access log says it)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    inputs: Inputs | None = None

    def emit(self, event: Event) -> None:
        """From a worker thread: hand ``event`` to the request's event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _failure(job: Job, exc: BaseException) -> Failed:
    """An exception of a job's preparation or generation as the event its client gets."""
    if isinstance(exc, ApiError):
        return Failed(exc)
    if isinstance(exc, BatcherClosed):  # the server is stopping: not the request's fault
        return Failed(ApiError(503, "the server is shutting down; retry on another instance"))
    if isinstance(exc, BundleError):  # the runtime's own state (a KV slot, the bundle): a server fault
        LOG.error("generation failed: %s", exc)
        return Failed(ApiError(500, f"internal error ({exc})"))
    if isinstance(exc, CCRAExportError):  # input the runtime refused: one line, the client's fault
        return Failed(refused(exc, len(job.request.messages)))
    LOG.exception("generation failed")  # the log keeps the traceback; the client gets one line
    return Failed(ApiError(500, f"internal error ({type(exc).__name__})"))


class Worker:
    """Prepares jobs (on the preparation threads) and runs them (on the generation threads, their
    tokens decoded by the batcher); owns the pipeline, the batcher and the held conversations."""

    def __init__(
        self,
        pipeline: Pipeline,
        limits: ImageLimits,
        store: ConversationStore,
        metrics: Metrics,
        batcher: ContinuousBatcher,
    ) -> None:
        self.pipeline, self.limits, self.store, self.metrics = pipeline, limits, store, metrics
        self.batcher = batcher
        self._decoding = threading.Lock()  # one image decoded at a time: its memory is bounded, not multiplied

    def warm_up(self) -> None:
        """One tiny generation: the server reports ready only after the whole path has run once."""
        image = Image.new("RGB", (64, 48), (128, 128, 128))
        conversation = self.new_conversation(time.perf_counter() + 60)
        try:
            conversation.ask("Describe the image.", image, Sampling(max_new_tokens=2))
        finally:
            conversation.close()

    def _slot(self, deadline: float) -> KVCache:
        """A free KV slot (one per generation thread: one is free unless something leaked)."""
        cache = self.batcher.pool.acquire(timeout=max(0.0, deadline - time.perf_counter()))
        if cache is None:
            raise ApiError(503, "no KV slot came free before the request's time limit", code="timeout")
        return cache

    def new_conversation(self, deadline: float) -> Conversation:
        """A conversation in a free KV slot, decoded by the batcher."""
        cache = self._slot(deadline)
        try:
            return self.pipeline.chat(cache, self.batcher)
        except BaseException:
            cache.release()
            raise

    def prepare(self, job: Job) -> bool:
        """Off the generation thread: check the request and decode its image (``job.inputs``).
        False when it was refused (its client has the error event)."""
        try:
            job.inputs = self._prepare(job.request)
            return True
        except Exception as exc:
            job.emit(_failure(job, exc))
            return False

    def _prepare(self, request: ChatRequest) -> Inputs:
        pipeline = self.pipeline
        parsed = parse_messages(request)
        stops = request.stops()
        # the conversation's length before anything is embedded, fetched or decoded
        prompt = conversation_tokens(pipeline, parsed.turns, parsed.question, self.store.answer_ids)
        asked = request.max_completion_tokens or request.max_tokens or 1
        context = pipeline.lm.context_length
        if prompt + asked > context:
            blamed = overflowing(prompt, context)
            raise InputError(
                f"the conversation is {prompt} prompt tokens (image tokens included); with {asked} new tokens it "
                f"would exceed the context of {context}",
                field="history" if blamed == "prompt" and parsed.turns else blamed,
            )
        data = fetch_image_bytes(parsed.image_url, self.limits, parsed.image_param)
        with self._decoding:
            image = decode_image_bytes(data, self.limits, pipeline.processor, parsed.image_param)
        return Inputs(parsed, stops, image, hashlib.sha256(data).hexdigest())

    def run(self, job: Job) -> None:
        try:
            if job.cancel.is_set():  # the client left while the request waited in the queue
                self.metrics.cancelled.labels("cancelled").inc()
                raise Stopped("cancelled")
            self._run(job)
        except Stopped as stop:
            job.emit(Done(stop.args[0], None))
        except Exception as exc:
            job.emit(_failure(job, exc))

    def _run(self, job: Job) -> None:
        inputs = job.inputs
        if inputs is None:  # run without prepare (a caller of the Python API): prepare here
            inputs = job.inputs = self._prepare(job.request)
        parsed, digest = inputs.parsed, inputs.digest
        conversation = self.store.take(history_key(digest, parsed.turns)) if parsed.turns else None
        self.metrics.conversations.labels("hit" if conversation is not None else "miss").inc()
        if conversation is None:
            conversation = self.new_conversation(job.deadline)
        else:  # a held conversation: its tokens go back into a slot
            cache = self._slot(job.deadline)
            try:
                conversation.resume(cache)
            except BaseException:
                cache.release()
                conversation.close()
                raise
        job.slot = conversation.cache.slot
        kept: list[bool] = []  # set once the store holds it: a later failure must not close it
        try:
            self._generate(job, conversation, inputs, kept)
        finally:
            if not kept:  # refused, failed, cancelled or cut by a stop string: the slot goes back
                conversation.close()

    def _generate(self, job: Job, conversation: Conversation, inputs: Inputs, kept: list[bool]) -> None:
        """Replay what the conversation lacks, then answer; ``kept`` gets True once the
        conversation is suspended into the store (which holds it, or closes it)."""
        request, pipeline = job.request, self.pipeline
        parsed, stops, image, digest = inputs.parsed, inputs.stops, inputs.image, inputs.digest
        if conversation.turns == 0 and parsed.turns:
            for index, (question, answer) in enumerate(parsed.turns):
                # the tokens the server generated for this answer, when it said it: the held state exactly
                known = self.store.answer_ids(answer)
                conversation.replay(question, answer, image if index == 0 else None, answer_ids=known)
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
        matcher = StopMatcher(stops)  # text that may be the start of a stop string is held until it is not
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
            ready, hit = matcher.feed(piece)
            send(ready)
            if hit:
                raise Stopped("stop")

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
            return  # a stop string cut the answer: the cache holds more than the client saw: not kept
        send(matcher.held)  # the answer ended without completing a stop string
        if first:
            self.metrics.ttft.observe(first[0] - job.arrived)
        generated = reply.generation.tokens
        ended = bool(generated) and generated[-1] in sampling.stop_ids
        completion = len(generated) - int(ended)
        prompt = context_before + reply.prompt_tokens  # the whole conversation, image tokens included
        usage = UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        said = "".join(text).strip()
        conversation.suspend()  # its tokens out of the pool, its slot back
        kept.append(True)
        self.store.put(history_key(digest, [*parsed.turns, (parsed.question, said)]), conversation)
        # what replaying this answer must feed to reach the state just held: the tokens generated, the
        # closing </s> excepted (a replay adds it), whatever their text re-tokenises to
        self.store.remember_answer(said, generated[:-1] if generated[-1:] == [conversation.eos_id] else generated)
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
    queue), the ``parallel`` generation threads, and the protocol models a finished or streamed job
    becomes. It knows no routes or HTTP responses: the router turns what it returns into those."""

    def __init__(
        self,
        worker: Worker,
        metrics: Metrics,
        *,
        model_name: str,
        max_queue: int,
        request_timeout_s: float,
        parallel: int = 1,
        ready: bool = False,
    ) -> None:
        self.worker, self.metrics = worker, metrics
        self.parallel = parallel
        self.model_name, self.max_queue, self.request_timeout_s = model_name, max_queue, request_timeout_s
        self.ready = ready
        self.in_flight = 0  # queued or generating
        # one thread per request generating (each waits on the batcher); the rest queue, first come first served
        self.executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="ccra-generate")
        # checks, image fetches and decodes, off the generation thread (at most the queue's worth at once)
        self.preparer = ThreadPoolExecutor(max_workers=max_queue, thread_name_prefix="ccra-prepare")
        self._jobs: set[asyncio.Task[None]] = set()

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
        task = loop.create_task(self._drive(job))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return job

    async def _drive(self, job: Job) -> None:
        """Prepare ``job`` on a preparation thread, then, unless it was refused, generate on the
        generation thread; the queue slot is held until both are done."""
        loop = asyncio.get_running_loop()
        try:
            if await loop.run_in_executor(self.preparer, self.worker.prepare, job):
                await loop.run_in_executor(self.executor, self.worker.run, job)
        finally:
            self._finished()

    def _finished(self) -> None:
        self.in_flight -= 1
        self.metrics.queue_depth.set(self.in_flight)

    def shutdown(self) -> None:
        """Stop taking work: queued jobs are dropped, the one generating ends at its next token.
        Call it on the event loop, or once the loop has stopped."""
        for task in list(self._jobs):
            with contextlib.suppress(RuntimeError):  # its loop is closed already: nothing left to cancel
                task.cancel()
        self.preparer.shutdown(wait=False, cancel_futures=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.worker.batcher.close()  # generations still running end with BatcherClosed
        self.worker.store.clear()

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
        counted = False
        try:
            yield sse(self._chunk(job, DeltaMessage(role="assistant", content="")))
            while True:
                event = await self._next_event(job, disconnected)
                match event:
                    case None:
                        counted = True
                        self.metrics.requests.labels("499").inc()
                        return
                    case Text(piece):
                        yield sse(self._chunk(job, DeltaMessage(content=piece)))
                    case Failed(error):
                        counted = True
                        self.metrics.requests.labels(str(error.status)).inc()
                        yield sse(error.response())
                        yield SSE_DONE
                        return
                    case Done(finish_reason, usage):
                        counted = True
                        self.metrics.requests.labels("200").inc()
                        yield sse(self._chunk(job, DeltaMessage(), finish_reason))
                        if wants_usage:
                            yield sse(self._chunk(job, None, usage=usage))
                        yield SSE_DONE
                        return
        finally:
            job.cancel.set()  # a client that went away mid-stream stops the generation at its next token
            if not counted:  # the stream was closed under us: the client left before its end
                self.metrics.requests.labels("499").inc()

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
