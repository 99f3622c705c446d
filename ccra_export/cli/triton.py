"""`ccra-export triton`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from ccra_export.cli import options as o
from ccra_export.cli.output import reports_errors, stderr, stdout
from ccra_export.serve.triton.config import TEXT_TYPES, VLM_MODEL
from ccra_export.serve.triton.repository import (
    DEVICES,
    INT32_MAX,
    UINT64_MAX,
    VISION_BACKENDS,
    RepoOptions,
    write_repository,
)


@click.command()
@o.options(
    o.LM_BUNDLE,
    o.opt(
        "repo",
        "--repo",
        required=True,
        type=click.Path(path_type=Path),
        help="Model repository directory to write (new or empty; or replaced with --force).",
    ),
    o.opt(
        "vision_backend",
        "--vision-backend",
        type=click.Choice(VISION_BACKENDS),
        default="auto",
        show_default=True,
        help="What runs ccra_vision (a split bundle's ccra_vision_tower and ccra_head) in Triton. tensorrt: the "
        "bundle's engine (platform tensorrt_plan); onnxruntime: the ONNX graph (platform onnxruntime_onnx); python: "
        "the ONNX graph in ONNX Runtime inside Triton's Python backend (any Triton, fused graphs included); auto: "
        "tensorrt when the bundle's engine was built for this machine's GPU, else onnxruntime (python for a fused "
        "graph).",
    ),
    o.opt(
        "device",
        "--device",
        type=click.Choice(DEVICES),
        default="auto",
        show_default=True,
        help="Instance group of the vision model(s) on ONNX Runtime: gpu (KIND_GPU, CUDA) or cpu (KIND_CPU); auto "
        "follows the device the bundle's language model was built for. TensorRT is always gpu.",
    ),
    o.opt(
        "text_type",
        "--text-type",
        type=click.Choice(TEXT_TYPES),
        default="string",
        show_default=True,
        help="How ccra_vlm's prompt and text travel. string: TYPE_STRING (Triton's usual, JSON strings on HTTP). "
        "uint8: UTF-8 bytes in a TYPE_UINT8 vector, for Python backends that cannot hand strings to numpy 2 "
        "(Triton 24.10 and older, e.g. PyPI's nvidia-pytriton 0.7).",
    ),
    o.opt(
        "max_queue_delay_us",
        "--max-queue-delay-us",
        default=2000,
        show_default=True,
        type=click.IntRange(0, UINT64_MAX),
        help="Microseconds each vision model's dynamic batcher waits for more requests to batch with the first.",
    ),
    o.opt(
        "vision_instances",
        "--vision-instances",
        default=1,
        show_default=True,
        type=click.IntRange(1, INT32_MAX),
        help="Instances of each vision model (per GPU for a GPU instance group).",
    ),
    o.opt(
        "vlm_instances",
        "--vlm-instances",
        default=1,
        show_default=True,
        type=click.IntRange(1, INT32_MAX),
        help="ccra_vlm instances: each generates one answer at a time and holds its own language model in memory.",
    ),
    o.opt(
        "max_new_tokens",
        "--max-new-tokens",
        default=256,
        show_default=True,
        type=click.IntRange(1, INT32_MAX),
        help="Tokens ccra_vlm generates when a request does not send max_new_tokens.",
    ),
    o.tower_cache_mib("each ccra_vlm instance keeps ", "calls only ccra_head"),
    o.PLUGIN_LIBRARY,
    o.opt("force", "--force", is_flag=True, help="Replace an existing --repo (only once the new one is complete)."),
)
@reports_errors
def triton(
    bundle: Path,
    repo: Path,
    vision_backend: str,
    device: str,
    text_type: str,
    max_queue_delay_us: int,
    vision_instances: int,
    vlm_instances: int,
    max_new_tokens: int,
    tower_cache_mib: float,
    plugin_library: Path | None,
    force: bool,
) -> None:
    """Write a Triton Inference Server model repository that serves the bundle.

    \b
    ccra_vision  the vision graph (TensorRT engine, ONNX Runtime, or the Python backend), dynamically batched
    ccra_vlm     image + prompt -> streamed text (Python backend, decoupled; calls ccra_vision through BLS)
    \b
    A split bundle (build --split-vision) gets ccra_vision_tower and ccra_head instead of ccra_vision;
    ccra_vlm calls the tower only for images missing from its tower cache (--tower-cache-mib).
    \b
    ccra-export triton --bundle out/vlm --repo out/triton
    docker run --gpus all --shm-size=1g -v $PWD/out/triton:/models ccra-triton tritonserver --model-repository=/models
    \b
    ccra-triton: NVIDIA's Triton image with ccra-export installed from a copy of its checkout
    (COPY . /opt/ccra-export, pip install '/opt/ccra-export[gpu]'; docs/triton.md has the Dockerfile).
    """
    options = RepoOptions(
        vision_backend=vision_backend,
        device=device,
        text_type=text_type,
        max_queue_delay_us=max_queue_delay_us,
        vision_instances=vision_instances,
        vlm_instances=vlm_instances,
        max_new_tokens=max_new_tokens,
        plugin_library=plugin_library,
        tower_cache_mib=tower_cache_mib,
    )
    with stderr.status("Writing the model repository"):
        result = write_repository(bundle, repo, options, force=force)
    stdout.print(escape(f"wrote {result.repo}"), soft_wrap=True)
    for index, (model, batching) in enumerate(result.batching.items()):
        preferred = ", ".join(map(str, batching.preferred)) or "none"
        stdout.print(
            escape(
                f"  {model}: {result.platform} on {'GPU' if result.gpu else 'CPU'}, max_batch_size "
                f"{batching.max_batch_size}, preferred {preferred}, queue delay {batching.max_queue_delay_us} us"
                + (f" ({result.reason})" if result.reason and index == 0 else "")
            ),
            soft_wrap=True,
        )
    cache = ""
    if result.tower_cache_mib is not None:
        cache = f", tower cache {result.tower_cache_mib:g} MiB" if result.tower_cache_mib else ", no tower cache"
    stdout.print(escape(f"  {VLM_MODEL}: python backend, decoupled, prompt/text as {text_type}{cache}"), soft_wrap=True)
    if result.copied:
        stdout.print("  (files were copied: the bundle is on another filesystem)")
    for note in result.notes:
        stdout.print(escape(f"  note: {note}"), soft_wrap=True)
    stdout.print(escape(f"start it: {result.launch.replace('/models', str(result.repo.resolve()))}"), soft_wrap=True)
