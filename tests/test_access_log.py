"""The server's access log: one line per request on stderr (through `transport.log_config`, as
`ccra-export serve` configures it), whose figures are what the client was told. A real server on a
free loopback port, the official `openai` client; every request loop is bounded in count and time."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time

import httpx
import openai
import pytest

from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.serve.openai.access_log import ACCESS_LOGGER, AccessEntry
from ccra_export.serve.openai.api_server import ServerSettings
from ccra_export.serve.openai.transport import log_config
from tests.servers import running
from tests.test_generation import PROMPT

TEXT_LINE = re.compile(
    r'^(?P<time>\S+Z) (?P<client>127\.0\.0\.1:\d+) "(?P<method>[A-Z]+) (?P<path>[^"]*)" (?P<status>\d{3}) '
    r"prompt_tokens=(?P<prompt_tokens>\S+) completion_tokens=(?P<completion_tokens>\S+) ttft_ms=(?P<ttft_ms>\S+) "
    r"total_ms=(?P<total_ms>\S+) slot=(?P<slot>\S+) id=(?P<id>\S+)$"
)
JSON_KEYS = [
    "time",
    "client",
    "method",
    "path",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "total_ms",
    "slot",
    "id",
]
HEALTH_FLOOD = 100


@pytest.fixture(scope="module")
def pipeline(ccra_bundle):
    return Pipeline.from_bundle(ccra_bundle)


@pytest.fixture(scope="module")
def image_url(cat):
    buffer = io.BytesIO()
    cat.resize((160, 120)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def log_stream():
    """The process's logging configured as `serve` configures it, into a string; restored after."""
    stream = io.StringIO()
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access", ACCESS_LOGGER)
    saved = {name: logging.getLogger(name) for name in names}
    state = {name: (lg.handlers[:], lg.level, lg.propagate, lg.filters[:]) for name, lg in saved.items()}
    try:
        yield stream
    finally:
        for name, lg in saved.items():
            lg.handlers[:], lg.level, lg.propagate, lg.filters[:] = state[name]


def messages(image_url: str) -> list[dict]:
    parts = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": image_url}}]
    return [{"role": "user", "content": parts}]


def wait_for_lines(stream: io.StringIO, count: int, timeout_s: float = 10.0) -> list[str]:
    """The stream's lines once there are ``count`` (a line is written just after its answer's last byte)."""
    deadline = time.monotonic() + timeout_s
    while len(lines := stream.getvalue().splitlines()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return lines


def test_text_lines_say_what_each_client_was_told_once_per_request(pipeline, image_url, log_stream):
    settings = ServerSettings(model_name="ccra-tiny", max_queue=4)
    with running(pipeline, settings, log_config=log_config(stream=log_stream)) as (url, _, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="ccra-tiny", messages=messages(image_url), max_tokens=8, temperature=0
        )
        chunks = list(
            client.chat.completions.create(
                model="ccra-tiny",
                messages=messages(image_url),
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        with pytest.raises(openai.NotFoundError):  # refused before any job exists
            client.chat.completions.create(model="not-served", messages=messages(image_url), max_tokens=2)
        with httpx.Client(base_url=url, timeout=10) as http:
            started = time.monotonic()
            for _ in range(HEALTH_FLOOD):  # a flood: one line each, none dropped by the log budget
                assert http.get("/health").status_code == 200
            assert time.monotonic() - started < 60
        lines = wait_for_lines(log_stream, 3 + HEALTH_FLOOD)
    parsed = [match for line in lines if (match := TEXT_LINE.match(line))]
    others = [line for line in lines if not TEXT_LINE.match(line)]
    assert len(parsed) == 3 + HEALTH_FLOOD, lines[:10]
    # no second line for a request (uvicorn's own access log is off)
    assert not [line for line in others if "/health" in line or "/v1/" in line], others[:5]
    by_id = {m["id"]: m for m in parsed if m["id"] != "-"}

    plain = by_id[reply.id]
    assert (plain["method"], plain["path"], plain["status"]) == ("POST", "/v1/chat/completions", "200")
    assert int(plain["prompt_tokens"]) == reply.usage.prompt_tokens
    assert int(plain["completion_tokens"]) == reply.usage.completion_tokens
    assert plain["slot"].isdigit()
    if reply.choices[0].message.content:  # text was sent: its first piece is the time to first token
        assert 0 < float(plain["ttft_ms"]) <= float(plain["total_ms"])

    usage = chunks[-1].usage
    streamed = by_id[chunks[0].id]
    assert streamed["status"] == "200" and streamed["slot"].isdigit()
    assert (int(streamed["prompt_tokens"]), int(streamed["completion_tokens"])) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    if "".join(c.choices[0].delta.content or "" for c in chunks if c.choices):
        assert 0 < float(streamed["ttft_ms"]) <= float(streamed["total_ms"])

    assert "-" not in (plain["ttft_ms"], streamed["ttft_ms"])  # the seeded tiny model answers with text

    refused = [m for m in parsed if m["status"] == "404"]
    assert len(refused) == 1
    assert [refused[0][k] for k in ("prompt_tokens", "completion_tokens", "ttft_ms", "slot", "id")] == ["-"] * 5
    health = [m for m in parsed if m["path"] == "/health"]
    assert len(health) == HEALTH_FLOOD and all(m["status"] == "200" and m["prompt_tokens"] == "-" for m in health)
    assert all(float(m["total_ms"]) >= 0 for m in parsed)


def test_json_lines_have_stable_keys_and_a_client_that_left_is_499(pipeline, image_url, log_stream):
    settings = ServerSettings(model_name="ccra-tiny", max_queue=4, log_format="json")
    with running(pipeline, settings, log_config=log_config(stream=log_stream)) as (url, app, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="ccra-tiny", messages=messages(image_url), max_tokens=6, temperature=0
        )
        # hold every generation thread, so the streamed request is still queued when its client leaves
        release = threading.Event()
        for _ in range(app.state.openai_serving_chat.parallel):
            app.state.executor.submit(release.wait, 60)
        try:
            body = {"messages": messages(image_url), "max_tokens": 6, "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as held:
                assert next(held.iter_lines()).startswith("data: ")  # the role chunk, then the client goes away
            lines = wait_for_lines(log_stream, 2)
        finally:
            release.set()
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200
        lines = wait_for_lines(log_stream, 3)
    records = [json.loads(line) for line in lines]
    assert len(records) == 3 and all(list(r) == JSON_KEYS for r in records), lines
    plain, left, models = records
    assert (plain["status"], plain["id"]) == (200, reply.id)
    assert (plain["prompt_tokens"], plain["completion_tokens"]) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    assert isinstance(plain["slot"], int) and plain["total_ms"] >= (plain["ttft_ms"] or 0)
    assert left["status"] == 499 and left["path"] == "/v1/chat/completions" and left["id"].startswith("chatcmpl-")
    assert left["prompt_tokens"] is None and left["completion_tokens"] is None and left["slot"] is None
    assert (models["method"], models["path"], models["status"], models["slot"]) == ("GET", "/v1/models", 200, None)


def test_a_hostile_request_target_stays_one_bounded_line():
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "raw_path": b'/a"b\n' + b"c" * 5000,
        "query_string": b"q=\x1b[31m",
        "client": ("127.0.0.1", 1234),
    }
    entry = AccessEntry.begin(scope)
    entry.status, entry.ended = 404, entry.started
    text, data = entry.record().text(), entry.record().json()
    assert "\n" not in text and "\x1b" not in text and len(text) < 800
    assert "\n" not in data and json.loads(data)["path"].startswith('/a"b\n')
