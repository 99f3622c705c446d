"""One access-log line per request, as uvicorn's access log and llama-server's request log write
them, with what a chat request adds: its prompt and completion tokens, time to first token and
the decode slot it ran in.

``AccessLog`` is the outermost ASGI middleware of the app, so every answer is logged: a chat
completion, /health, /models, /metrics, a refusal before any job exists (401, 404, 413, 429) and
the body limit's own (408, 413, 503). A streamed answer is logged when its stream ends; a client
that left first is logged as 499, as the metrics count it. Lines go to the ``ccra_export.serve.access``
logger, which ``transport.log_config`` sends to stderr on its own handler, past the log budget that
bounds every other record: one line per request, each bounded in length, never dropped, and none
from uvicorn's own access log (off), so a flood of requests makes as many lines as requests, no more.

``text``: ``TIME CLIENT "METHOD PATH" STATUS prompt_tokens=N completion_tokens=N ttft_ms=F total_ms=F
slot=N id=ID`` (``-`` for what a request does not have); ``json``: one object per line with those
keys always present (null for what is absent), for log collectors.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccra_export.serve.openai.serving_chat import Done, Event, Failed, Job, Text

ACCESS_LOGGER = "ccra_export.serve.access"
LOG_FORMATS = ("text", "json")
#: the request target as logged: longer ones are cut (h11 already bounds the request line)
MAX_TARGET_CHARS = 512
#: nginx's "client closed request": the status of an answer its client did not wait for
CLIENT_CLOSED = 499
#: where the route finds the request's entry (``request.state``)
STATE_KEY = "access_log"
LOG = logging.getLogger(ACCESS_LOGGER)


@dataclass
class AccessEntry:
    """What one request's line says. The middleware fills in the HTTP side; a chat request's job
    (``observe``) its tokens, first token and slot, from the generation's thread."""

    method: str
    target: str
    client: str
    started: float  # time.perf_counter() when the request reached the app
    wall: float  # time.time() then, for the line's timestamp
    status: int | None = None  # as sent in the response's start
    ended: float | None = None  # when the last byte of the body was handed to the server
    disconnected: bool = False  # the client left before the answer ended
    job: Job | None = None
    first_token: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    failed_status: int | None = None  # a stream's error after its 200 went out (what the metrics count)

    @classmethod
    def begin(cls, scope: Scope) -> AccessEntry:
        target = scope.get("raw_path") or scope.get("path", "").encode()
        query = scope.get("query_string") or b""
        text = (target + (b"?" + query if query else b"")).decode("latin-1")
        if len(text) > MAX_TARGET_CHARS:
            text = text[:MAX_TARGET_CHARS] + "..."
        host, port = scope.get("client") or ("-", 0)
        return cls(
            method=str(scope.get("method", "-"))[:16],
            target=text,
            client=f"{host}:{port}",
            started=time.perf_counter(),
            wall=time.time(),
        )

    def final_status(self) -> int:
        """The status the line reports: 499 when the client left before the answer ended, a
        stream's late error as its own status, else what was sent (500 when nothing was)."""
        if self.disconnected or (self.status is not None and self.ended is None):
            return CLIENT_CLOSED
        if self.failed_status is not None:
            return self.failed_status
        return self.status if self.status is not None else 500

    def record(self) -> AccessRecord:
        ended = self.ended if self.ended is not None else time.perf_counter()
        ttft = None if self.first_token is None else round((self.first_token - self.started) * 1000, 1)
        return AccessRecord(
            time=datetime.fromtimestamp(self.wall, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            client=self.client,
            method=self.method,
            path=self.target,
            status=self.final_status(),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            ttft_ms=ttft,
            total_ms=round((ended - self.started) * 1000, 1),
            slot=None if self.job is None else self.job.slot,
            id=None if self.job is None else self.job.id,
        )


@dataclass(frozen=True)
class AccessRecord:
    """One line's fields, in the order and under the names both formats use."""

    time: str
    client: str
    method: str
    path: str
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_ms: float | None
    total_ms: float
    slot: int | None
    id: str | None

    def json(self) -> str:
        """One JSON object: every key always there (null when absent), non-ASCII escaped."""
        return json.dumps(self.__dict__, separators=(",", ":"))

    def text(self) -> str:
        """uvicorn's shape (client, quoted request, status) and llama-server's figures as key=value."""

        def value(field: int | float | str | None) -> str:
            return "-" if field is None else str(field)

        request = json.dumps(f"{self.method} {self.path}")  # quoted, control characters escaped: one line
        figures = " ".join(
            f"{name}={value(getattr(self, name))}"
            for name in ("prompt_tokens", "completion_tokens", "ttft_ms", "total_ms", "slot", "id")
        )
        return f"{self.time} {self.client} {request} {self.status} {figures}"


def observe(entry: AccessEntry | None, job: Job) -> None:
    """Have ``entry`` learn from ``job``'s events what its line reports (tokens from the usage the
    client gets, the first piece of text, a late error). Call it before the event loop runs again
    after ``submit``: the job's threads start only then, so no event is missed."""
    if entry is None:
        return
    entry.job = job
    emit = job.emit

    def emitting(event: Event) -> None:
        if isinstance(event, Text) and entry.first_token is None:
            entry.first_token = time.perf_counter()
        elif isinstance(event, Done) and event.usage is not None:
            entry.prompt_tokens = event.usage.prompt_tokens
            entry.completion_tokens = event.usage.completion_tokens
        elif isinstance(event, Failed):
            entry.failed_status = event.error.status
        emit(event)

    job.emit = emitting  # type: ignore[method-assign]


class AccessLog:
    """The ASGI middleware that writes each request's line when its answer has ended (or its
    client has gone); ``log_format``: ``text`` or ``json``."""

    def __init__(self, app: ASGIApp, log_format: str = "text", logger: logging.Logger = LOG) -> None:
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format {log_format!r}; expected one of {', '.join(LOG_FORMATS)}")
        self.app, self.log_format, self.logger = app, log_format, logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entry = AccessEntry.begin(scope)
        scope.setdefault("state", {})[STATE_KEY] = entry

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and entry.ended is None:
                entry.disconnected = True
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                entry.ended = time.perf_counter()  # before the send: a disconnect heard after it is not the client's
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        finally:
            self.write(entry.record())

    def write(self, record: AccessRecord) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(record.json() if self.log_format == "json" else record.text())
