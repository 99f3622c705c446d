"""`ccra-export run`."""

from __future__ import annotations

from pathlib import Path

import click

from ccra_export.cli import options as o
from ccra_export.cli.output import reports_errors, stderr
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline, load_image


@click.command()
@o.options(
    o.opt(
        "bundle", "--bundle", required=True, type=click.Path(path_type=Path), help="Bundle built with --lm-precision."
    ),
    o.opt("image", "--image", required=True, type=click.Path(path_type=Path), help="Image file (jpg, png, ...)."),
    o.opt("prompt", "--prompt", required=True, help="The question or instruction about the image."),
    o.opt(
        "max_new_tokens",
        "--max-new-tokens",
        default=256,
        show_default=True,
        type=click.IntRange(1),
        help="Stop after this many generated tokens (or at the end-of-sequence token).",
    ),
    o.opt(
        "temperature",
        "--temperature",
        default=0.0,
        show_default=True,
        type=click.FloatRange(0.0),
        help="0: greedy decoding; above 0: sampling at this temperature.",
    ),
    o.opt(
        "top_p",
        "--top-p",
        default=1.0,
        show_default=True,
        type=click.FloatRange(0.0, 1.0),
        help="Nucleus sampling mass.",
    ),
    o.opt("seed", "--seed", type=int, help="Sampling seed."),
    o.opt("verify", "--verify", is_flag=True, help="Re-hash every bundle file against the manifest before running."),
    o.backend("auto", "ort", "trt", help=o.RUN_BACKEND_HELP),
)
@reports_errors
def run(
    bundle: Path,
    image: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    verify: bool,
    backend: str,
) -> None:
    """Answer PROMPT about IMAGE with the bundle's vision graph and language model, streaming tokens."""
    picture = load_image(image)  # a bad image fails before the models load
    pipeline = Pipeline.from_bundle(bundle, backend=backend, verify=verify)
    sampling = Sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_ids=pipeline.lm.eos_ids
    )
    _, generation, prepared = pipeline.generate_tokens(
        picture, prompt, sampling, on_text=lambda piece: click.echo(piece, nl=False)
    )
    click.echo()
    steps = len(generation.tokens)
    stderr.print(
        f"[dim]{prepared.inputs_embeds.shape[1]} prompt tokens ({prepared.visual_tokens.shape[1]} visual), "
        f"{steps} new; first token {generation.prefill_s * 1e3:.0f} ms, "
        f"{max(steps - 1, 0) / max(generation.decode_s, 1e-9):.1f} tokens/s[/dim]"
    )
