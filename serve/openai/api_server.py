"""The HTTP side: OpenAI's Chat Completions on FastAPI, a bounded queue, auth, limits, metrics.

    POST /v1/chat/completions   text + image_url parts, multi-turn, stream (server-sent events)
    GET  /v1/models             the bundle as one model
    GET  /health                200 once the bundle is loaded and a warm-up generation passed
    GET  /metrics               Prometheus text format

Every error is OpenAI's JSON error object with its status, never a traceback; the process keeps
serving after any bad request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB
from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.serve.openai.conversations import ConversationStore
from ccra_export.serve.openai.image_urls import ImageLimits
from ccra_export.serve.openai.metrics import Metrics
from ccra_export.serve.openai.protocol import ApiError, ChatRequest, invalid_request
from ccra_export.serve.openai.serving_chat import Job, Worker


@dataclass
class ServerSettings:
    model_name: str = "ccra"
    api_key: str | None = None
    max_queue: int = 16
    max_body_bytes: int = 32 << 20
    request_timeout_s: float = 300.0
    held_conversations_bytes: int = 2 << 30  # KV caches of conversations kept for follow-ups
    images: ImageLimits = field(default_factory=ImageLimits)


class BodyLimit:
    """413 for a request body over the limit, whether it says its length or streams chunks."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(send, ApiError(413, f"request body over {self.limit} bytes"))
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_error(send, ApiError(413, f"request body over {self.limit} bytes"))


class _TooLarge(Exception):
    pass


async def _send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def create_app(pipeline: Pipeline, settings: ServerSettings, *, ready: bool = False) -> FastAPI:
    """The app over a loaded pipeline. ``ready``: the warm-up already ran (else /health is 503 until
    ``app.state.warm_up()`` has run)."""
    app = FastAPI(title="ccra-export", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(tower_cache=pipeline.tower_cache)
    worker = Worker(pipeline, settings.images, ConversationStore(settings.held_conversations_bytes), metrics)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccra-generate")  # one decoder, FIFO
    state: dict[str, Any] = {"ready": ready, "in_flight": 0}
    app.state.metrics, app.state.worker, app.state.executor = metrics, worker, executor

    def warm_up() -> None:
        worker.warm_up()
        state["ready"] = True

    app.state.warm_up = warm_up
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        metrics.requests.labels(str(exc.status)).inc()  # every refusal raised in a route is counted here
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await _api_error(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return await _api_error(request, ApiError(500, f"internal error ({type(exc).__name__})"))

    def authorise(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), settings.api_key.encode())):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": settings.model_name})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        authorise(request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorise(request)
        entry = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ccra-export"}
        return JSONResponse({"object": "list", "data": [entry]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorise(request)
        try:
            payload = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the body must be a JSON object with messages", param="messages")
        try:
            body = ChatRequest.model_validate(payload)
        except ValidationError as exc:
            raise invalid_request(exc.errors()) from None
        if body.model not in (None, settings.model_name):
            raise ApiError(
                404, f"model {body.model!r} is not served here (GET /v1/models)", param="model", code="model_not_found"
            )
        if not state["ready"]:
            raise ApiError(503, "the model is still loading (GET /health)")
        if state["in_flight"] >= settings.max_queue:
            metrics.requests.labels("429").inc()
            return error_response(
                ApiError(429, f"the queue is full ({settings.max_queue} requests); retry later"), {"Retry-After": "1"}
            )
        loop = asyncio.get_running_loop()
        job = Job(body, loop, asyncio.Queue(), time.perf_counter() + settings.request_timeout_s)
        state["in_flight"] += 1
        metrics.queue_depth.set(state["in_flight"])
        future = loop.run_in_executor(executor, worker.run, job)

        def finished(_: Any) -> None:
            state["in_flight"] -= 1
            metrics.queue_depth.set(state["in_flight"])

        future.add_done_callback(finished)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(
                _stream(job, request, ident, created, settings.model_name, metrics, body),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await _complete(job, request, ident, created, settings.model_name, metrics)

    return app


async def _next_event(job: Job, request: Request) -> tuple[Any, ...] | None:
    """The job's next event; None (and the job cancelled) when the client went away."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                return None


async def _complete(job: Job, request: Request, ident: str, created: int, model: str, metrics: Metrics) -> Response:
    pieces: list[str] = []
    while True:
        event = await _next_event(job, request)
        if event is None:
            metrics.requests.labels("499").inc()
            return Response(status_code=499)
        if event[0] == "text":
            pieces.append(event[1])
        elif event[0] == "error":
            metrics.requests.labels(str(event[1].status)).inc()
            return error_response(event[1])
        else:
            _, finish, usage = event
            metrics.requests.labels("200").inc()
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "finish_reason": finish}
            return JSONResponse(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )


async def _stream(
    job: Job, request: Request, ident: str, created: int, model: str, metrics: Metrics, body: ChatRequest
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> bytes:
        data = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n".encode()

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await _next_event(job, request)
            if event is None:
                metrics.requests.labels("499").inc()
                return
            if event[0] == "text":
                yield chunk({"content": event[1]})
            elif event[0] == "error":
                metrics.requests.labels(str(event[1].status)).inc()
                yield f"data: {json.dumps(event[1].body())}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
            else:
                _, finish, usage = event
                metrics.requests.labels("200").inc()
                wants_usage = body.stream_options is not None and body.stream_options.include_usage
                yield chunk({}, finish)
                if wants_usage:
                    usage_chunk = {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                    yield f"data: {json.dumps(usage_chunk)}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
    finally:
        job.cancel.set()  # a client that went away mid-stream stops the generation at its next token


def load_pipeline(bundle: Path, backend: str = "auto", tower_cache_mib: float = DEFAULT_TOWER_CACHE_MIB) -> Pipeline:
    return Pipeline.from_bundle(bundle, backend=backend, tower_cache_mib=tower_cache_mib)
