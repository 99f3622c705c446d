"""`ccra-export serve`: a real server on a loopback port, spoken to by the official `openai` client
and by raw HTTP for every error path. Every request loop is bounded in count and time."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.serve.openai.api_server import ServerSettings, create_app
from ccra_export.serve.openai.image_urls import ImageLimits
from tests.test_generation import PROMPT

FOLLOW_UP = "And what colour is it?"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(pipeline: Pipeline, settings: ServerSettings):
    """The app under uvicorn on 127.0.0.1:free port, in a thread; stopped on exit (bounded waits)."""
    app = create_app(pipeline, settings)
    app.state.warm_up()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start in 30 s"
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(scope="module")
def pipeline(ccra_bundle):
    return Pipeline.from_bundle(ccra_bundle)


@pytest.fixture(scope="module")
def server(pipeline):
    with running(pipeline, ServerSettings(model_name="ccra-tiny", max_queue=4)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def photo(cat):
    buffer = io.BytesIO()
    cat.resize((160, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def first_turn(png: bytes, text: str = PROMPT) -> dict:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": data_url(png)}}]
    return {"role": "user", "content": parts}


def decoded(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def test_openai_client_gets_the_pipelines_greedy_answer(server, pipeline, photo):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="ccra-tiny", messages=[first_turn(photo)], max_tokens=8, temperature=0)
    want_text, generation, prepared = pipeline.generate_tokens(
        decoded(photo), PROMPT, Sampling(max_new_tokens=8, stop_ids=pipeline.lm.eos_ids)
    )
    assert reply.choices[0].message.content == want_text
    assert reply.choices[0].finish_reason in ("stop", "length")
    ended = generation.tokens[-1] in pipeline.lm.eos_ids
    assert reply.usage.prompt_tokens == prepared.inputs_embeds.shape[1]  # image tokens included
    assert reply.usage.completion_tokens == len(generation.tokens) - int(ended)
    stream = client.chat.completions.create(
        model="ccra-tiny", messages=[first_turn(photo)], max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list().data] == ["ccra-tiny"]


def test_a_follow_up_continues_the_held_conversation(server, pipeline, photo):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [first_turn(photo, "Describe the picture.")]
    one = client.chat.completions.create(model="ccra-tiny", messages=messages, max_tokens=6, temperature=0)
    messages += [
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": FOLLOW_UP},
    ]
    before = _metric(server, 'ccra_conversation_lookups_total{result="hit"}')
    two = client.chat.completions.create(model="ccra-tiny", messages=messages, max_tokens=6, temperature=0)
    assert _metric(server, 'ccra_conversation_lookups_total{result="hit"}') == before + 1
    chat = pipeline.chat()
    sampling = {"max_new_tokens": 6, "stop_ids": pipeline.lm.eos_ids}
    assert (
        one.choices[0].message.content == chat.ask("Describe the picture.", decoded(photo), Sampling(**sampling)).text
    )
    assert two.choices[0].message.content == chat.ask(FOLLOW_UP, None, Sampling(**sampling)).text
    # the whole conversation counts as the prompt, as OpenAI counts it
    assert two.usage.prompt_tokens > one.usage.prompt_tokens + one.usage.completion_tokens
    # a history the server does not hold (an edited answer) is replayed, not refused
    messages[1]["content"] = "A cat."
    before_miss = _metric(server, 'ccra_conversation_lookups_total{result="miss"}')
    three = client.chat.completions.create(model="ccra-tiny", messages=messages, max_tokens=4, temperature=0)
    assert three.choices[0].message.content is not None
    assert _metric(server, 'ccra_conversation_lookups_total{result="miss"}') == before_miss + 1


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _post(url: str, body, headers: dict | None = None, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=content,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=60,
    )


def _error(response: httpx.Response, status: int, fragment: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]
    return error


@pytest.mark.parametrize(
    ("make_body", "status", "fragment"),
    [
        (lambda png: None, 400, "messages"),
        (lambda png: {"messages": []}, 400, "messages"),
        (lambda png: {"messages": [first_turn(png)], "n": 2}, 400, "only n=1"),
        (lambda png: {"messages": [{"role": "user", "content": "no image here"}]}, 400, "needs an image_url"),
        (lambda png: {"messages": [first_turn(png)], "temperature": 7}, 400, "temperature"),
        (lambda png: {"messages": [first_turn(png)], "max_tokens": 0}, 400, "max_tokens"),
        (
            lambda png: {"messages": [first_turn(png), {"role": "user", "content": "again?"}]},
            400,
            "expected a assistant message",
        ),
        (
            lambda png: {"messages": [first_turn(png), {"role": "assistant", "content": "x"}, first_turn(png)]},
            400,
            "one image, in the first user message",
        ),
        (
            lambda png: {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}},
                            {"type": "text", "text": "q"},
                        ],
                    }
                ]
            },
            400,
            "invalid base64",
        ),
        (
            lambda png: {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
                            {"type": "text", "text": "q"},
                        ],
                    }
                ]
            },
            400,
            "not a readable image",
        ),
        (
            lambda png: {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "/etc/passwd"}},
                            {"type": "text", "text": "q"},
                        ],
                    }
                ]
            },
            400,
            "local paths are not served",
        ),
        (
            lambda png: {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}},
                            {"type": "text", "text": "q"},
                        ],
                    }
                ]
            },
            400,
            "not fetched by this server",
        ),
        (lambda png: {"messages": [first_turn(png)], "model": "gpt-4o"}, 404, "is not served here"),
        (lambda png: {"messages": [first_turn(png, "what is <image> here?")]}, 400, "contains <image>"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, photo, make_body, status, fragment):
    _error(_post(server, make_body(photo)), status, fragment)
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_not_json_unknown_route_and_nan(server, photo):
    _error(_post(server, None, raw=b"{not json"), 400, "not JSON")
    _error(httpx.get(f"{server}/v1/nothing", timeout=10), 404, "Not Found")
    raw = json.dumps({"messages": [first_turn(photo)], "temperature": float("nan")}).encode()  # Python writes NaN
    _error(_post(server, None, raw=raw), 400, "temperature")


def test_api_key_limits_and_full_queue(pipeline, photo):
    settings = ServerSettings(
        api_key="s3cret", max_queue=1, max_body_bytes=200_000, images=ImageLimits(max_pixels=100 * 100)
    )
    with running(pipeline, settings) as (url, app):
        body = {"messages": [first_turn(photo)], "max_tokens": 2, "temperature": 0}
        _error(_post(url, body), 401, "API key")
        _error(_post(url, body, {"Authorization": "Bearer wrong"}), 401, "API key")
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # /health needs no key
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        _error(_post(url, body, key), 413, "160x120 pixels")  # over --max-image-pixels
        small = io.BytesIO()
        Image.new("RGB", (64, 48), (10, 200, 30)).save(small, format="PNG")
        body["messages"] = [first_turn(small.getvalue())]
        assert _post(url, body, key).status_code == 200
        _error(_post(url, None, key, raw=b"x" * 300_000), 413, "request body over")
        # hold the generation thread, so the one queue slot fills deterministically
        release = threading.Event()
        app.state.executor.submit(release.wait, 60)
        try:
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=key, timeout=60
            ) as held:
                assert held.status_code == 200
                assert next(held.iter_lines()).startswith("data: ")  # the role chunk: it is queued
                refused = _post(url, body, key)
                _error(refused, 429, "queue is full")
                assert refused.headers["Retry-After"] == "1"
            # the client hung up before its generation ran: the job is cancelled, not generated
        finally:
            release.set()
        deadline = time.monotonic() + 30
        while _metric_with(url, key, 'ccra_cancelled_total{reason="cancelled"}') < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _metric_with(url, key, 'ccra_cancelled_total{reason="cancelled"}') == 1
        for _ in range(50):  # bounded: the freed slot takes the next request
            response = _post(url, body, key)
            if response.status_code != 429:
                break
            time.sleep(0.2)
        assert response.status_code == 200
        text = httpx.get(f"{url}/metrics", headers=key, timeout=10).text
        names = ("ccra_requests_total", "ccra_queue_depth", "ccra_time_to_first_token_seconds", "ccra_decode_tokens")
        assert all(name in text for name in names)
        assert 'ccra_requests_total{status="429"}' in text and 'ccra_requests_total{status="200"}' in text


def _metric_with(url: str, headers: dict, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_stop_strings_cut_the_answer(server, pipeline, photo):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    full = client.chat.completions.create(model="ccra-tiny", messages=[first_turn(photo)], max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    if len(text) < 3:
        pytest.skip(f"the random model's answer {text!r} is too short to cut")
    stop = text[2:4]
    cut = client.chat.completions.create(
        model="ccra-tiny", messages=[first_turn(photo)], max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)], (text, stop)
    assert cut.choices[0].finish_reason == "stop"
    assert np.isfinite(cut.usage.completion_tokens)


def test_a_request_past_its_time_limit_is_stopped(pipeline, photo):
    with running(pipeline, ServerSettings(request_timeout_s=0.001)) as (url, _):
        error = _error(_post(url, {"messages": [first_turn(photo)], "max_tokens": 50}), 500, "time limit")
        assert error["code"] == "timeout"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_held_conversations_are_bounded_in_bytes():
    from types import SimpleNamespace

    from ccra_export.serve.openai.conversations import ConversationStore

    def conversation(nbytes):
        return SimpleNamespace(cache=SimpleNamespace(nbytes=nbytes))

    store = ConversationStore(max_bytes=100)
    for key in ("a", "b", "c"):
        store.put(key, conversation(40))
    assert store.stats()["held"] == 2 and store.stats()["bytes"] == 80  # "a", the oldest, went first
    assert store.take("a") is None and store.take("c") is not None
    store.put("huge", conversation(500))  # alone over the budget: not held
    assert store.take("huge") is None
    assert store.stats() == {"held": 1, "bytes": 40, "hits": 1, "misses": 2}


def test_http_image_urls_are_fetched_only_when_allowed_and_within_limits(pipeline, photo, tmp_path):
    """A loopback HTTP server stands in for a camera or a CDN; the fetch has a size cap."""
    import functools
    import http.server

    (tmp_path / "cat.png").write_bytes(photo)
    (tmp_path / "big.png").write_bytes(photo + b"\0" * 4096)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the test's output stays readable
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"

    def ask(url, name):
        parts = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": f"{base}/{name}"}}]
        return _post(url, {"messages": [{"role": "user", "content": parts}], "max_tokens": 2, "temperature": 0})

    try:
        limits = ImageLimits(allow_urls=True, max_bytes=len(photo) + 100)
        with running(pipeline, ServerSettings(images=limits)) as (url, _):
            assert ask(url, "cat.png").status_code == 200
            _error(ask(url, "big.png"), 413, "larger than")
            _error(ask(url, "missing.png"), 400, "could not fetch it")
    finally:
        files.shutdown()


def test_a_client_asking_more_tokens_than_the_context_hears_of_max_tokens(server, photo):
    """An OpenAI client that sent max_tokens=100000 was told to lower --max-new-tokens, a flag of
    another program; the refusal names the request's field."""
    reply = _post(server, {"messages": [first_turn(photo)], "max_tokens": 100000})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "max_tokens", error
    assert "exceed the context" in error["message"] and "--" not in error["message"]
