"""Servers the tests start themselves: a free loopback port, and the OpenAI app under uvicorn as
`ccra-export serve` configures it, stopped on exit with bounded waits."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from ccra_export.runtime.vlm_pipeline import Pipeline


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(pipeline: Pipeline, settings: Any, **overrides: Any) -> Iterator[tuple[str, Any, int]]:
    """``(base URL, app, port)`` of the app on 127.0.0.1:free port, in a thread (``settings``: the
    server's ``ServerSettings``; ``overrides`` go to ``transport.uvicorn_config``)."""
    import uvicorn  # the [serve] extra: only the server tests need it

    from ccra_export.serve.openai.api_server import create_app
    from ccra_export.serve.openai.transport import uvicorn_config

    app = create_app(pipeline, settings)
    app.state.warm_up()
    port = free_port()
    overrides.setdefault("log_config", None)  # the test process's logging stays as it is
    config = uvicorn_config(app, "127.0.0.1", port, settings.connections, timeout_graceful_shutdown=5, **overrides)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start in 30 s"
    try:
        yield f"http://127.0.0.1:{port}", app, port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.openai_serving_chat.shutdown()
