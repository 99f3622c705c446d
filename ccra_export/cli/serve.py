"""`ccra-export serve`."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.markup import escape

from ccra_export.cli import options as o
from ccra_export.cli.output import reports_errors, stderr
from ccra_export.core.errors import ConfigError
from ccra_export.core.extras import require

API_KEY_ENV = "CCRA_API_KEY"


@click.command()
@o.options(
    o.LM_BUNDLE,
    o.opt("host", "--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface)."),
    o.opt("port", "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port."),
    o.opt(
        "api_key",
        "--api-key",
        metavar="KEY|env",
        help=f"Require `Authorization: Bearer KEY` on every route but /health; `env` reads ${API_KEY_ENV}.",
    ),
    o.opt(
        "max_queue",
        "--max-queue",
        default=16,
        show_default=True,
        type=click.IntRange(1),
        help="Requests waiting or running before 429.",
    ),
    o.opt(
        "max_image_pixels",
        "--max-image-pixels",
        default=40_000_000,
        show_default=True,
        type=click.IntRange(1),
        help="Largest image accepted: the pixels preprocessing holds (width x height, or the square LLaVA-1.5's "
        "pad-to-square makes of it: 30000x1 counts as 30000x30000), checked from the header before decoding.",
    ),
    o.opt(
        "max_connections",
        "--max-connections",
        default=1024,
        show_default=True,
        type=click.IntRange(1, 1 << 20),
        help="Open connections at once (lowered to fit the file-descriptor limit); past it, the connection that has "
        "waited longest for a request is closed. A request's headers must arrive within 10 s, each piece of its "
        "body within 30 s.",
    ),
    o.opt(
        "allow_image_dir",
        "--allow-image-dir",
        type=click.Path(path_type=Path, file_okay=False, exists=True),
        help="Serve image_url local paths, only under this directory (off by default).",
    ),
    o.opt(
        "allow_image_urls",
        "--allow-image-urls",
        is_flag=True,
        help="Fetch http(s) image_url (10 s, 20 MiB limits). Off by default: a server that fetches URLs it is handed "
        "can be pointed at the device's own network.",
    ),
    o.opt(
        "request_timeout",
        "--request-timeout",
        default=300.0,
        show_default=True,
        type=click.FloatRange(1.0),
        help="Seconds a request may take, queue included; generation stops at the next token after it.",
    ),
    o.opt(
        "held_mib",
        "--held-conversations-mib",
        default=2048,
        show_default=True,
        type=click.IntRange(0),
        help="Memory for conversations kept for their follow-up requests: between turns a conversation's cached "
        "tokens are copied out of its KV slot (about 0.5 MiB a token for a 7B FP16 decoder), the least recently "
        "used dropped past this (a follow-up to one replays its history). 0 keeps none.",
    ),
    o.opt(
        "parallel",
        "--parallel",
        type=click.IntRange(1, 256),
        help="Requests generating at once, their tokens decoded together (continuous batching), each in a KV slot "
        "of the served context. Default: as many slots as half the available memory holds, at most 4.",
    ),
    o.opt(
        "context",
        "--context",
        type=click.IntRange(1),
        help="Tokens a conversation may hold (image tokens included), at most the bundle's: a shorter context "
        "allocates smaller KV slots. Default: the bundle's.",
    ),
    o.opt("model_name", "--model-name", default="ccra", show_default=True, help="The model id clients name."),
    o.opt(
        "log_format",
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="The access log on stderr, one line per request (method, path, status, prompt and completion tokens, "
        "time to first token, total ms, decode slot): text, or json (one object a line, for log collectors).",
    ),
    o.TOWER_CACHE_MIB,
    o.run_backend("auto", "ort", "trt"),
)
@reports_errors
def serve(
    bundle: Path,
    host: str,
    port: int,
    api_key: str | None,
    max_queue: int,
    max_image_pixels: int,
    max_connections: int,
    allow_image_dir: Path | None,
    allow_image_urls: bool,
    request_timeout: float,
    held_mib: int,
    parallel: int | None,
    context: int | None,
    model_name: str,
    log_format: str,
    tower_cache_mib: float,
    backend: str,
) -> None:
    """Serve the bundle over OpenAI's Chat Completions API (text + image, multi-turn, streaming).

    \b
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
      "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}]}]}'
    """
    require("serve", "ccra-export serve")
    import uvicorn

    from ccra_export.serve.openai.api_server import ServerSettings, create_app, load_pipeline
    from ccra_export.serve.openai.image_urls import ImageLimits
    from ccra_export.serve.openai.transport import ConnectionLimits, uvicorn_config

    if api_key == "env":
        api_key = os.environ.get(API_KEY_ENV)
        if not api_key:
            raise ConfigError(f"--api-key env: ${API_KEY_ENV} is not set")
    settings = ServerSettings(
        model_name=model_name,
        api_key=api_key,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        held_conversations_bytes=held_mib << 20,
        parallel=parallel,
        images=ImageLimits(max_pixels=max_image_pixels, allow_urls=allow_image_urls, allow_dir=allow_image_dir),
        connections=ConnectionLimits(max_connections=max_connections),
        log_format=log_format,
    )
    check_slots(bundle, context, parallel, held_mib << 20, tower_cache_mib)  # before anything loads
    with stderr.status("Loading the bundle and warming up"):
        app = create_app(load_pipeline(bundle, backend, tower_cache_mib, context), settings)
        app.state.warm_up()
    auth = "API key required" if api_key else "no API key"
    plan, lm = app.state.slot_plan, app.state.worker.pipeline.lm
    stderr.print(
        escape(
            f"{plan.parallel} requests at once ({plan.why}); {plan.slot_bytes / (1 << 20):.1f} MiB of KV per slot "
            f"at a context of {lm.context_length} tokens"
        )
    )
    stderr.print(escape(f"serving {bundle} as {model_name!r} on http://{host}:{port}/v1 ({auth}); Ctrl-C stops"))
    uvicorn.Server(uvicorn_config(app, host, port, settings.connections)).run()


def check_slots(bundle: Path, context: int | None, parallel: int | None, held_bytes: int, tower_mib: float) -> None:
    """The served context and the KV slots against the bundle and this machine's memory, from the
    bundle's files alone (the decoder's config and graph inputs, the weights' sizes): what the
    server would refuse after loading for minutes is refused first. The memory the weights, the
    tower cache and the runtime will take is counted out of what is available now."""
    from ccra_export.core.manifest import read_manifest
    from ccra_export.core.platform import detect_jetson
    from ccra_export.runtime.batching import kv_memory, plan_slots
    from ccra_export.workflows.doctor import bundle_footprint, kv_layout

    kv = kv_layout(bundle)
    if context is not None and context > kv.max_context:
        raise ConfigError(f"a context of {context} tokens; the bundle serves at most {kv.max_context}", field="context")
    served = context or kv.max_context
    device = (read_manifest(bundle).get("language_model") or {}).get("device", "cpu")
    shared = detect_jetson() is not None
    memory = kv_memory(device, shared)
    if memory is not None:
        memory -= bundle_footprint(bundle, tower_mib).fixed_bytes
    plan_slots(kv.slot_bytes(served), served, parallel, held_bytes, memory)
