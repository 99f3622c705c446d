"""The server's connections: what uvicorn does not bound by itself.

uvicorn (h11) times out a connection only once it has answered on it (keep-alive), so a socket
that never completes a request, or drips its headers a byte at a time, stays open for ever; and
when such sockets use up the process's file descriptors, every ``accept`` fails and is logged
with a traceback. Here:

- ``GuardedH11Protocol``: a request's headers must arrive within ``header_timeout_s`` of the
  connection opening (or of the previous answer on it), else the connection is closed; at most
  ``max_connections`` are open (below the descriptor limit): a new one past it closes the
  connection that has waited longest for a request, or itself when all are busy, so idle sockets
  cannot lock out a health check;
- ``LogBudget``: a logging filter that lets each kind of message through a few times a minute and
  then counts the rest (one line says how many were dropped), so a flood of failures cannot
  flood the log;
- ``uvicorn_config``: uvicorn configured with both, its keep-alive timeout and h11's header size
  bound, and uvicorn's own access log off: ``access_log`` writes one line per request, on a handler
  of its own outside the budget (a request's line is never dropped, and there is exactly one).
The body's own time limit and size are ``api_server.BodyLimit``'s.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ccra_export.serve.openai.access_log import ACCESS_LOGGER

#: descriptors left to the rest of the process (model files, pipes, the threads' own)
RESERVED_DESCRIPTORS = 64


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0  # a request line and headers, from connecting (or the last answer)
    keep_alive_s: int = 5  # an idle keep-alive connection, after an answer
    body_timeout_s: float = 30.0  # each piece of a request body (api_server.BodyLimit)
    max_connections: int = 1024  # open at once; lowered to fit the descriptor limit
    max_header_bytes: int = 16 << 10  # h11's bound on a request line and its headers


def _descriptors() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def accept_backlog() -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one go: small
    beside the descriptor limit, so a burst of connections cannot take the descriptors the
    connections closed to make room for them still hold."""
    soft = _descriptors()
    return 2048 if soft is None else max(8, min(2048, soft // 16))


def connection_cap(wanted: int, reserve: int = RESERVED_DESCRIPTORS) -> int:
    """``wanted`` connections, or fewer where the soft descriptor limit would run out first: the
    reserve and a few accept bursts (each closes its surplus a loop turn or two later) are kept free."""
    soft = _descriptors()
    if soft is None:
        return wanted
    return max(1, min(wanted, soft - reserve - 4 * accept_backlog()))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (class attributes, set
    by ``guarded_protocol``)."""

    header_timeout_s: float = ConnectionLimits.header_timeout_s
    max_connections: int = ConnectionLimits.max_connections
    shed = 0  # connections closed to make room (a count for tests and logs)
    header_timeouts = 0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._header_timer: Any = None
        self.waiting_since = time.monotonic()
        super().connection_made(transport)
        self._arm_header_timer()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self.waiting_since = time.monotonic()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def waiting_for_request(self) -> bool:
        """No request of this connection is being answered (none came yet, or the last one was)."""
        return self.cycle is None or self.cycle.response_complete

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.waiting_for_request() and not self.transport.is_closing():
            type(self).header_timeouts += 1
            self.transport.close()

    def _make_room(self) -> None:
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)]
        idle = [c for c in idle if c.waiting_for_request() and not c.transport.is_closing()]
        victim = min(idle, key=lambda c: c.waiting_since) if idle else self
        type(self).shed += 1
        victim.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.waiting_for_request():  # a request's headers are in: the app has it (and its body limits)
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request's headers get the same deadline; so does the rest of a body answered
        # before it was read (a 401, a 413), which would otherwise keep the connection open byte by byte
        if not self.transport.is_closing() and self.waiting_for_request():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A ``GuardedH11Protocol`` class for one server's limits (uvicorn takes a class)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": limits.header_timeout_s, "max_connections": connection_cap(limits.max_connections)},
    )


class LogBudget(logging.Filter):
    """At most ``per_kind`` records of each kind (logger and message template) and ``total`` in
    all per ``window_s``; the rest are dropped and counted, and the next record let through after
    a drop says how many went."""

    def __init__(self, per_kind: int = 5, total: int = 60, window_s: float = 60.0) -> None:
        super().__init__()
        self.per_kind, self.total, self.window_s = per_kind, total, window_s
        self._window = time.monotonic()
        self._counts: dict[tuple[str, str], int] = {}
        self._passed = 0
        self.dropped = 0
        self._unreported = 0
        self._lock = threading.Lock()  # records come from the event loop and the worker threads

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            return self._admit(record)

    def _admit(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._window >= self.window_s:
            self._window, self._counts, self._passed = now, {}, 0
        key = (record.name, str(record.msg))
        seen = self._counts.get(key, 0)
        self._counts[key] = seen + 1
        if seen >= self.per_kind or self._passed >= self.total:
            self.dropped += 1
            self._unreported += 1
            return False
        self._passed += 1
        if self._unreported:
            record.msg = f"{record.msg} [{self._unreported} similar log records dropped]"
            self._unreported = 0
        return True


def log_config(level: str = "warning", stream: Any = "ext://sys.stderr") -> dict[str, Any]:
    """uvicorn's logging, every record (uvicorn's, asyncio's, ccra-export's) through one ``LogBudget``,
    but the access log's lines, one per request, which have a handler of their own (``stream``:
    where the lines go, stderr by default)."""
    formatter = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s", "use_colors": None}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": stream, "filters": ["budget"]}
    access = {"class": "logging.StreamHandler", "formatter": "access", "stream": stream}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"budget": {"()": LogBudget}},
        "formatters": {"default": formatter, "access": {"format": "%(message)s"}},
        "handlers": {"default": handler, "access": access},
        "loggers": {
            ACCESS_LOGGER: {"handlers": ["access"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": ["default"], "level": level.upper(), "propagate": False},
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
    }


def uvicorn_config(
    app: Any, host: str, port: int, limits: ConnectionLimits | None = None, **overrides: Any
) -> uvicorn.Config:
    """uvicorn's configuration for the server: the guarded protocol, the keep-alive timeout, h11's
    header bound and the log budget (``overrides``: other uvicorn.Config arguments)."""
    limits = limits or ConnectionLimits()
    settings: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": guarded_protocol(limits),
        "timeout_keep_alive": limits.keep_alive_s,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
        "backlog": accept_backlog(),
        "log_level": "warning",
        "log_config": log_config(),
        "access_log": False,  # access_log.AccessLog writes the one line per request
        **overrides,
    }
    return uvicorn.Config(app, **settings)
