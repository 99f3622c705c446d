"""`ccra-export run`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ccra_export.cli import options as o
from ccra_export.cli.output import reports_errors, stderr
from ccra_export.runtime.inputs import InputError, check_prompt, load_image
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import no_attention_map
from ccra_export.workflows.backends import open_pipeline
from ccra_export.workflows.explain import require_matplotlib, save_overlay


@click.command()
@o.options(
    o.LM_BUNDLE,
    o.IMAGE,
    o.opt(
        "prompt",
        "--prompt",
        help="The question or instruction about the image (with --interactive: the first one; asked for if absent).",
    ),
    o.opt(
        "interactive",
        "--interactive",
        "-i",
        is_flag=True,
        help="Chat about the image: after each answer, read the next question from the terminal (an empty line or "
        "end of input ends it). Follow-ups reuse the conversation's KV cache, so each prefills only its own tokens.",
    ),
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
        type=o.FiniteFloat(0.0),
        help="0: greedy decoding; above 0: sampling at this temperature.",
    ),
    o.opt(
        "top_p",
        "--top-p",
        default=1.0,
        show_default=True,
        type=o.FiniteFloat(0.0, 1.0),
        help="Nucleus sampling mass: sample among the most likely tokens whose probabilities reach it. 0 keeps "
        "only the top token (greedy); the top token is always kept.",
    ),
    o.opt("seed", "--seed", type=o.SEED, help="Sampling seed, in [0, 2**64)."),
    o.opt(
        "attention_map",
        "--attention-map",
        type=click.Path(path_type=Path, dir_okay=False),
        help="CCRA bundles: also write the photo with the LPWCA attention over it to this .png (needs the "
        "[explain] extra; `ccra-export explain` draws the rest).",
    ),
    o.opt(
        "independent",
        "--independent",
        is_flag=True,
        help="With --interactive: answer each question on its own about the image (a fresh conversation, CCRA's "
        "visual tokens conditioned on that question) instead of as a chat. With a split bundle (build "
        "--split-vision) the tower's output is cached, so each question after the first runs only CCRA's head.",
    ),
    o.opt(
        "context",
        "--context",
        type=click.IntRange(1),
        help="Tokens the conversation may hold (image tokens included), at most the bundle's: a shorter context "
        "allocates a smaller KV cache. Default: the bundle's.",
    ),
    o.TOWER_CACHE_MIB,
    o.opt("verify", "--verify", is_flag=True, help="Re-hash every bundle file against the manifest before running."),
    o.run_backend("auto", "ort", "trt", "ort-trt"),
    o.PLUGIN_LIBRARY,
)
@reports_errors
def run(
    bundle: Path,
    image: Path,
    prompt: str | None,
    interactive: bool,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    attention_map: Path | None,
    independent: bool,
    context: int | None,
    tower_cache_mib: float,
    verify: bool,
    backend: str,
    plugin_library: Path | None,
) -> None:
    """Answer PROMPT about IMAGE with the bundle's vision graph and language model, streaming tokens.

    With --interactive, keep asking: a terminal chat about the one image.
    """
    if not interactive and prompt is None:
        raise InputError("--prompt: missing; give the question (or use --interactive)")
    if prompt is not None:
        check_prompt(prompt)  # "" too: an empty question is refused, not an empty run that exits 0
    if attention_map is not None:
        require_matplotlib("--attention-map")
        if attention_map.suffix.lower() != ".png":
            raise InputError(f"--attention-map {attention_map}: expected a .png file name")
        target = attention_map.resolve()
        if target == image.resolve():
            raise InputError(f"--attention-map {attention_map}: is the --image; it would be overwritten")
        if target.is_relative_to(bundle.resolve()):
            raise InputError(f"--attention-map {attention_map}: is inside the --bundle; write it somewhere else")
    if independent and not interactive:
        raise InputError("--independent: applies to --interactive (one --prompt is one question already)")
    picture = load_image(image)  # a bad image fails before the models load
    pipeline = open_pipeline(bundle, backend, verify, plugin_library, tower_cache_mib, context)
    pipeline.check_image(picture, image)  # the square it is padded to, before the vision graph runs
    if attention_map is not None and not pipeline.has_attention:
        raise no_attention_map(bundle)
    conversation = pipeline.chat()
    question = prompt if prompt is not None else _read_question()
    while question:
        if independent and conversation.turns:
            conversation = pipeline.chat()  # a new question about the same image, not a follow-up
        sampling = Sampling(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_ids=pipeline.lm.eos_ids
        )
        reply = conversation.ask(
            question, picture if conversation.turns == 0 else None, sampling, on_text=lambda p: click.echo(p, nl=False)
        )
        click.echo()
        if attention_map is not None and reply.attention is not None:
            save_overlay(attention_map, picture, pipeline.attention_map(reply.attention[0], picture.size))
        steps = len(reply.generation.tokens)
        vision = f"vision {reply.vision_s * 1e3:.0f} ms{_cache_note(pipeline)}, " if reply.visual_tokens else ""
        stderr.print(
            f"[dim]{reply.prompt_tokens} prompt tokens ({reply.visual_tokens} visual), {steps} new; {vision}"
            "first token "
            f"{reply.generation.prefill_s * 1e3:.0f} ms, "
            f"{max(steps - 1, 0) / max(reply.generation.decode_s, 1e-9):.1f} tokens/s; "
            f"context {conversation.tokens_used}/{conversation.cache.capacity}[/dim]"
        )
        question = _read_question() if interactive else None


def _cache_note(pipeline: Any) -> str:
    """`` (tower cached: 1 hit, 1 miss)`` for a split bundle; empty otherwise."""
    cache = pipeline.tower_cache
    if cache is None:
        return ""
    stats = cache.stats()
    return f" (tower cache: {stats.hits} hits, {stats.misses} misses)"


def _read_question() -> str | None:
    """The next question from standard input; None at an empty line or the end of input."""
    click.echo("> ", nl=False, err=True)
    line = sys.stdin.readline()  # one shared stream: a fresh wrapper per call would lose read-ahead lines
    return line.strip() or None
