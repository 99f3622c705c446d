"""`ccra-export serve`: a real server on a loopback port, spoken to by the official `openai` client
and by raw HTTP for every error path. Every request loop is bounded in count and time."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.serve.openai.api_server import ServerSettings, create_app
from ccra_export.serve.openai.image_urls import ImageLimits
from tests.servers import running
from tests.test_generation import PROMPT

FOLLOW_UP = "And what colour is it?"


@pytest.fixture(scope="module")
def pipeline(ccra_bundle):
    return Pipeline.from_bundle(ccra_bundle)


@pytest.fixture(scope="module")
def server(pipeline):
    with running(pipeline, ServerSettings(model_name="ccra-tiny", max_queue=4)) as (url, _, _):
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
    with running(pipeline, settings) as (url, app, _):
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
        # hold every generation thread, so the one queue slot fills deterministically
        release = threading.Event()
        for _ in range(app.state.openai_serving_chat.parallel):
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
    with running(pipeline, ServerSettings(request_timeout_s=0.001)) as (url, _, _):
        error = _error(_post(url, {"messages": [first_turn(photo)], "max_tokens": 50}), 500, "time limit")
        assert error["code"] == "timeout"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_held_conversations_are_bounded_in_bytes():
    """Over the budget the least recently held goes, and every conversation that leaves the store
    unclaimed is closed (its KV slot goes back to the pool)."""
    from types import SimpleNamespace

    from ccra_export.serve.openai.conversations import ConversationStore

    closed: list[int] = []

    def conversation(nbytes, used=0):
        held = SimpleNamespace(held_bytes=nbytes, cache=SimpleNamespace(capacity=10), tokens_used=used)
        held.close = lambda: closed.append(nbytes)
        return held

    store = ConversationStore(max_bytes=100)
    for key in ("a", "b", "c"):
        store.put(key, conversation(40))
    assert store.stats()["held"] == 2 and store.stats()["bytes"] == 80  # "a", the oldest, went first
    assert closed == [40]
    assert store.take("a") is None and store.take("c") is not None
    store.put("huge", conversation(500))  # alone over the budget: not held
    store.put("full", conversation(10, used=10))  # no room left in its context: nothing could follow
    assert closed == [40, 500, 10]
    assert store.take("huge") is None
    assert store.stats() == {"held": 1, "bytes": 40, "hits": 1, "misses": 2}
    store.clear()
    assert closed[-1] == 40 and store.stats()["held"] == 0


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
        with running(pipeline, ServerSettings(images=limits)) as (url, _, _):
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


def _events(response: httpx.Response) -> list:
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def test_stream_chunks_have_openais_fields_and_usage_only_when_asked(server, photo):
    """The wire, not the client's parse of it: a delta carries only what changed, every choice its
    (null) finish_reason, and ``usage`` rides only the extra last chunk include_usage asks for."""
    body = {"messages": [first_turn(photo)], "max_tokens": 3, "temperature": 0, "stream": True}
    plain = _events(_post(server, body))
    assert plain[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in plain)
    assert {c["id"] for c in plain} == {plain[0]["id"]} and plain[0]["object"] == "chat.completion.chunk"
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in plain[1:-1])
    assert plain[-1]["choices"][0]["delta"] == {} and plain[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    with_usage = _events(_post(server, {**body, "stream_options": {"include_usage": True}}))
    assert all("usage" not in c for c in with_usage[:-1])
    assert with_usage[-1]["choices"] == [] and set(with_usage[-1]["usage"]) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    }
    refused = _events(_post(server, {**body, "stop": [""]}))  # refused on the generation thread, after the 200
    assert refused[-1] == {
        "error": {
            "message": "stop: up to 4 non-empty strings",
            "type": "invalid_request_error",
            "param": "stop",
            "code": None,
        }
    }


def test_response_models_write_openais_wire_fields():
    """Which keys are left out and which are written as null is the protocol models' rule."""
    from ccra_export.serve.openai.protocol import (
        ApiError,
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
        HealthResponse,
        UsageInfo,
    )

    usage = UsageInfo(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    reply = ChatCompletionResponse(
        id="chatcmpl-1",
        created=7,
        model="m",
        choices=[ChatCompletionResponseChoice(message=ChatMessage(content="hi"), finish_reason="stop")],
        usage=usage,
    )
    assert json.loads(reply.model_dump_json()) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    assert json.loads(ApiError(429, "full", headers={"Retry-After": "1"}).response().model_dump_json()) == {
        "error": {"message": "full", "type": "rate_limit_error", "param": None, "code": None}
    }
    assert HealthResponse(status="loading").model_dump_json() == '{"status":"loading"}'


def test_every_route_but_health_depends_on_the_api_key():
    """Auth is one FastAPI dependency on the router's routes: a route added later without it fails here."""
    from ccra_export.serve.openai.api_server import require_api_key, router

    keyed = {
        route.path: any(d.call is require_api_key for d in route.dependant.dependencies) for route in router.routes
    }
    assert keyed == {"/health": False, "/metrics": True, "/v1/models": True, "/v1/chat/completions": True}


def test_before_the_warm_up_health_and_chat_say_loading(pipeline, photo):
    from fastapi.testclient import TestClient

    app = create_app(pipeline, ServerSettings())  # no warm-up yet
    try:
        with TestClient(app) as client:
            health = client.get("/health")
            assert (health.status_code, health.json()) == (503, {"status": "loading"})
            _error(client.post("/v1/chat/completions", json={"messages": [first_turn(photo)]}), 503, "still loading")
    finally:
        app.state.executor.shutdown(wait=False)


def test_the_serving_logic_runs_without_http_or_a_model():
    """OpenAIServingChat over a stand-in worker: the events become the response models, a failed
    generation raises its ApiError, and a client that went away cancels the job."""
    import asyncio

    from ccra_export.serve.openai.metrics import Metrics
    from ccra_export.serve.openai.protocol import ApiError, ChatRequest, UsageInfo
    from ccra_export.serve.openai.serving_chat import Done, Failed, OpenAIServingChat, Text

    usage = UsageInfo(prompt_tokens=4, completion_tokens=2, total_tokens=6)

    class Scripted:
        def __init__(self, *events):
            self.events = events

        def prepare(self, job):  # the preparation thread's step: nothing to check here
            return True

        def run(self, job):
            for event in self.events:
                job.emit(event)

    async def never() -> bool:
        return False

    async def gone() -> bool:
        return True

    request = ChatRequest.model_validate({"messages": [{"role": "user", "content": "q"}], "model": "m"})

    def serve(worker, disconnected=never):
        async def go():
            serving = OpenAIServingChat(worker, Metrics(), model_name="m", max_queue=2, request_timeout_s=5, ready=True)
            try:
                job = serving.submit(request)
                return job, await serving.complete(job, disconnected)
            finally:
                serving.executor.shutdown(wait=True)

        return asyncio.run(go())

    job, reply = serve(Scripted(Text("a"), Text("b"), Done("stop", usage)))
    assert reply.choices[0].message.content == "ab" and reply.usage == usage and reply.id == job.id
    with pytest.raises(ApiError, match="bad") as failed:
        serve(Scripted(Failed(ApiError(400, "bad", param="messages"))))
    assert failed.value.param == "messages"
    job, reply = serve(Scripted(), gone)  # no event: the poll finds the client gone
    assert reply is None and job.cancel.is_set()
