"""The HTTP side: OpenAI's Chat Completions on FastAPI, split as vLLM splits its entrypoint. This
module holds the router (module-level routes that find what they serve in ``request.app.state``),
the API-key dependency, the error handlers, the body limit and ``create_app``, which assembles
them; the serving logic is ``serving_chat``, the request and response models ``protocol``.

    POST /v1/chat/completions   text + image_url parts, multi-turn, stream (server-sent events)
    GET  /v1/models             the bundle as one model
    GET  /health                200 once the bundle is loaded and a warm-up generation passed
    GET  /metrics               Prometheus text format

Every error is OpenAI's JSON error object with its status, never a traceback; the process keeps
serving after any bad request. Every request, answered or refused, is one access-log line
(``access_log``). A body is bounded in size (by default what one image and a full
context of text can take), in time (each piece must arrive within ``body_timeout_s``) and, over
all requests at once, in bytes held; it is parsed off the event loop, one at a time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import State
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccra_export.core.platform import detect_jetson
from ccra_export.runtime.batching import ContinuousBatcher, kv_memory, plan_slots
from ccra_export.runtime.language_model import KVPool
from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB
from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.serve.openai.access_log import STATE_KEY, AccessLog, observe
from ccra_export.serve.openai.conversations import ConversationStore
from ccra_export.serve.openai.image_urls import ImageLimits
from ccra_export.serve.openai.metrics import Metrics
from ccra_export.serve.openai.protocol import ApiError, HealthResponse, OpenAIBaseModel, parse_chat_request
from ccra_export.serve.openai.serving_chat import OpenAIServingChat, Worker
from ccra_export.serve.openai.transport import ConnectionLimits

LOG = logging.getLogger("ccra_export.serve")
#: JSON bytes one character of text can take (``\u0001``), for a body limit that fits the context
JSON_BYTES_PER_CHAR = 6
#: the body's own keys, the roles and the parts' framing, beyond the image and the text
BODY_OVERHEAD = 1 << 20


@dataclass
class ServerSettings:
    model_name: str = "ccra"
    api_key: str | None = None
    max_queue: int = 16
    #: None: what one image (base64) and a full context of text (JSON-escaped) can take, no more
    max_body_bytes: int | None = None
    request_timeout_s: float = 300.0
    held_conversations_bytes: int = 2 << 30  # cached tokens of conversations kept for follow-ups
    #: requests generating at once (continuous batching), each in a KV slot; None: what memory allows
    parallel: int | None = None
    images: ImageLimits = field(default_factory=ImageLimits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: bytes of request bodies held at once, over all requests (None: four bodies' worth)
    max_body_bytes_in_flight: int | None = None
    #: the access log's lines (access_log.LOG_FORMATS): "text" or "json" (one object a line, for collectors)
    log_format: str = "text"


def body_limit(settings: ServerSettings, pipeline: Pipeline) -> int:
    """The largest body worth reading: the image as base64, and as much text as the context can
    hold at 6 JSON bytes a character (a body past that is refused for its length either way)."""
    if settings.max_body_bytes is not None:
        return settings.max_body_bytes
    image = -(-settings.images.max_bytes // 3) * 4 + 64  # base64 and the data: URL's header
    return image + JSON_BYTES_PER_CHAR * pipeline.max_text_chars + BODY_OVERHEAD


class BodyLimit:
    """413 for a request body over the limit, whether it says its length or streams chunks; 408
    when a piece of it takes more than ``timeout_s`` to arrive; 503 when the bodies held at once
    would exceed ``in_flight`` bytes (many large uploads at once cannot exhaust memory)."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float = 30.0, in_flight: int | None = None) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s
        self.in_flight = in_flight if in_flight is not None else 4 * limit
        self.held = 0  # bytes of bodies of the requests being served (declared or received so far)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(send, ApiError(413, f"request body over {self.limit} bytes"), close=True)
            return
        reserved = int(declared) if declared is not None and declared.isdigit() else 0
        if reserved and self.held + reserved > self.in_flight:
            error = ApiError(503, "the server is receiving too many large requests; retry later", headers=_RETRY)
            await _send_error(send, error, close=True)
            return
        self.held += reserved
        seen = 0
        complete = False

        async def limited() -> Message:
            nonlocal seen, complete, reserved
            if complete:  # the body is in: only a disconnect is left to hear, however late
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                raise _TooSlow from None
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            if seen > reserved:  # a chunked body: held as it arrives
                self.held += seen - reserved
                reserved = seen
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_error(send, ApiError(413, f"request body over {self.limit} bytes"), close=True)
        except _TooSlow:
            await _send_error(send, ApiError(408, f"the request body stalled for {self.timeout_s:g} s"), close=True)
        finally:
            self.held -= reserved


_RETRY = {"Retry-After": "1"}


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


async def _send_error(send: Send, error: ApiError, close: bool = False) -> None:
    """An error answered below FastAPI (the body limit runs before any route); ``close``: the
    connection too (the rest of a refused body is not read)."""
    body = error.response().model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in (error.headers or {}).items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class CatchAll:
    """The last resort inside Starlette's error middleware: an exception no handler took becomes a
    500 in OpenAI's shape, logged once (through the log budget) and not re-raised, so uvicorn
    neither prints it again nor drops the keep-alive connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            LOG.exception("request failed")
            if not started:
                metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
                if metrics is not None:
                    metrics.requests.labels("500").inc()
                await _send_error(send, ApiError(500, f"internal error ({type(exc).__name__})"))


def json_response(model: OpenAIBaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``model`` as the response body, serialised by the model (its wire shape, protocol.py)."""
    return Response(model.model_dump_json(), status_code=status, headers=headers, media_type="application/json")


def error_response(error: ApiError) -> Response:
    return json_response(error.response(), error.status, error.headers)


# --- what the routes find in app.state (init_app_state puts it there) ---


def serving_chat(request: Request) -> OpenAIServingChat:
    return request.app.state.openai_serving_chat


def server_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def server_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def require_api_key(request: Request) -> None:
    """Every route but /health (a load balancer probes it without a key) depends on this: with
    ``--api-key``, a request must carry ``Authorization: Bearer KEY`` (compared in constant time)."""
    expected = server_settings(request).api_key
    if expected is None:
        return
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    # the scheme is case-insensitive (RFC 9110: "bearer" is "Bearer")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")


router = APIRouter()
KEYED = [Depends(require_api_key)]


@router.get("/health")
async def health(request: Request) -> Response:
    serving = serving_chat(request)
    if not serving.ready:
        return json_response(HealthResponse(status="loading"), 503)
    return json_response(HealthResponse(status="ok", model=serving.model_name))


@router.get("/metrics", dependencies=KEYED)
async def prometheus(request: Request) -> Response:
    return Response(server_metrics(request).render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", dependencies=KEYED)
async def show_available_models(request: Request) -> Response:
    return json_response(serving_chat(request).models())


@router.post("/v1/chat/completions", dependencies=KEYED)
async def create_chat_completion(request: Request) -> Response:
    raw = await request.body()
    # JSON and pydantic hold the interpreter while they run: one body at a time on the parse thread,
    # so a large one delays other parses, not the event loop's every connection (a /health probe)
    parser: ThreadPoolExecutor = request.app.state.parser
    body = await asyncio.get_running_loop().run_in_executor(parser, parse_chat_request, raw)
    del raw
    serving = serving_chat(request)
    job = serving.submit(body)
    observe(getattr(request.state, STATE_KEY, None), job)  # before the loop runs the job: no event missed
    if body.stream:
        return StreamingResponse(
            serving.stream(job, request.is_disconnected),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    reply = await serving.complete(job, request.is_disconnected)
    if reply is None:  # the client went away: nobody reads this (nginx's "client closed request")
        return Response(status_code=499)
    return json_response(reply)


# --- errors: every refusal and crash leaves as OpenAI's error object, counted by its status ---


async def _api_error(request: Request, exc: ApiError) -> Response:
    server_metrics(request).requests.labels(str(exc.status)).inc()  # every refusal raised in a route
    return error_response(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Starlette's own refusals (an unknown route, a wrong method) in OpenAI's shape."""
    return await _api_error(request, ApiError(exc.status_code, str(exc.detail)))


async def _crash(request: Request, exc: Exception) -> Response:
    """A bug: the client gets its type's name, never the traceback (the server log keeps it)."""
    return await _api_error(request, ApiError(500, f"internal error ({type(exc).__name__})"))


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)


def init_app_state(state: State, pipeline: Pipeline, settings: ServerSettings, *, ready: bool = False) -> None:
    """What the routes serve: the settings, the metrics and the chat serving over ``pipeline``."""
    metrics = Metrics(tower_cache=pipeline.tower_cache)
    lm = pipeline.lm
    memory = kv_memory(lm.device, detect_jetson() is not None)
    plan = plan_slots(
        lm.kv_slot_bytes(), lm.context_length, settings.parallel, settings.held_conversations_bytes, memory
    )
    pool = KVPool(lm, plan.parallel)
    batcher = ContinuousBatcher(lm, pool)
    store = ConversationStore(settings.held_conversations_bytes)
    worker = Worker(pipeline, settings.images, store, metrics, batcher)
    serving = OpenAIServingChat(
        worker,
        metrics,
        model_name=settings.model_name,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        parallel=plan.parallel,
        ready=ready,
    )
    state.settings, state.metrics, state.openai_serving_chat = settings, metrics, serving
    state.slot_plan = plan
    state.parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccra-parse")
    # what the CLI and the tests reach for: the warm-up to run, the generation thread to hold or stop
    state.worker, state.executor, state.warm_up = worker, serving.executor, serving.warm_up


def create_app(pipeline: Pipeline, settings: ServerSettings, *, ready: bool = False) -> FastAPI:
    """The app over a loaded pipeline. ``ready``: the warm-up already ran (else /health is 503 until
    ``app.state.warm_up()`` has run)."""
    app = FastAPI(title="ccra-export", docs_url=None, redoc_url=None, openapi_url=None)
    init_app_state(app.state, pipeline, settings, ready=ready)
    app.include_router(router)
    limit = body_limit(settings, pipeline)
    app.add_middleware(
        BodyLimit,
        limit=limit,
        timeout_s=settings.connections.body_timeout_s,
        in_flight=settings.max_body_bytes_in_flight,
    )
    app.add_middleware(CatchAll)
    app.add_middleware(AccessLog, log_format=settings.log_format)  # outermost: every answer is logged, once
    register_error_handlers(app)
    return app


def load_pipeline(
    bundle: Path, backend: str = "auto", tower_cache_mib: float = DEFAULT_TOWER_CACHE_MIB, context: int | None = None
) -> Pipeline:
    return Pipeline.from_bundle(bundle, backend=backend, tower_cache_mib=tower_cache_mib, context=context)
