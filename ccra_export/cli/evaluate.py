"""`ccra-export eval`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from ccra_export.cli import options as o
from ccra_export.cli.output import reports_errors, stderr, stdout
from ccra_export.core import atomic
from ccra_export.core.console import Steps, titled
from ccra_export.core.errors import BundleError, ParityError
from ccra_export.core.lm_quality import bounds_for
from ccra_export.core.parity import thresholds_for
from ccra_export.workflows.evaluate import EVAL_MAX_NEW_TOKENS, EvalReport, evaluate


@click.command("eval")
@o.options(
    o.LM_BUNDLE,
    o.opt(
        "data",
        "--data",
        type=click.Path(path_type=Path),
        help="JSON Lines, one item a line: image (a path relative to the file), question, and optionally "
        "answer (python -m ccra_export.core.shapes --out DIR writes such a file for the demo's task). "
        "Default: the bundle's own evaluation set (16 held-out questions of the shapes task, written at build).",
    ),
    o.reference(
        "pytorch: PyTorch FP32 answers now (the export extra and the checkpoint); recorded: the answers "
        "PyTorch gave at build, for the bundle's own evaluation set (no PyTorch needed: a Jetson); auto: "
        "pytorch where it is installed, else recorded."
    ),
    o.opt(
        "model",
        "--model",
        metavar="demo|DIR",
        help="The checkpoint the bundle was built from (PyTorch's "
        "answers); a bundle built from demo finds the shipped one by itself.",
    ),
    o.opt("limit", "--limit", type=click.IntRange(min=1), help="Evaluate the first N items only."),
    o.opt(
        "max_new_tokens",
        "--max-new-tokens",
        type=click.IntRange(min=1, max=4096),
        default=EVAL_MAX_NEW_TOKENS,
        show_default=True,
        help="Longest answer, both sides (the recorded answers were made with the default).",
    ),
    o.opt("json_out", "--json", type=click.Path(path_type=Path), help="Also write the figures (per item too) here."),
    o.backend("auto", "ort", "trt"),
)
@reports_errors
def eval_command(
    bundle: Path,
    data: Path | None,
    reference: str,
    model: str | None,
    limit: int | None,
    max_new_tokens: int,
    json_out: Path | None,
    backend: str,
) -> None:
    """Answer a question set with the bundle and with PyTorch, and compare.

    Reports answer flips (the bundle's answer differs from PyTorch FP32's), the accuracy of both
    against the given answers, teacher-forced next-token KL divergence, top-1 agreement and Δp on
    PyTorch's answer tokens, and the worst visual token's cosine. Exit 3 when a bound fails (the
    language model's per decoder precision, the vision graph's per vision precision).
    """
    report = evaluate(
        bundle,
        data,
        model=model,
        reference=reference,
        limit=limit,
        max_new_tokens=max_new_tokens,
        backend=backend,
        steps=Steps(stderr),
    )
    stdout.print(_table(report))
    if json_out is not None:
        try:
            atomic.write_json(json_out, finite(report.to_dict()))
        except OSError as exc:
            raise BundleError(f"cannot write ({exc.strerror or exc})", field="json_out", value=json_out) from None
    if not report.passed:
        raise ParityError("; ".join(report.failures))
    stdout.print("[green]eval passed[/green]")


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null: strict JSON (an unlaid prompt scores infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


def _percent(value: float | None) -> str:
    return "n/a (no answers given)" if value is None else f"{100 * value:.1f}%"


def _table(report: EvalReport) -> Table:
    bounds = bounds_for(report.lm_precision, report.kv_cache)
    forced = report.next_token
    table = titled(
        f"{escape(report.bundle)} vs {report.reference}: {len(report.items)} questions "
        f"(vision {report.vision_precision}, language model {report.lm_precision})"
    )
    for column in ("figure", "value", "bound"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    table.add_row("answers flipped vs PyTorch", _percent(report.flip_rate), f"<= {100 * report.flip_limit:g}%")
    table.add_row("accuracy, bundle", _percent(report.accuracy("ours")), "reported")
    table.add_row("accuracy, PyTorch", _percent(report.accuracy("reference")), "reported")
    measured = "the decoder alone" if report.decoder_only else "end to end"
    table.add_row(
        f"next-token KL, mean ({forced.positions} answer tokens, {measured})",
        f"{forced.kl_mean:.3e}",
        f"<= {bounds.max_kl_mean:g}",
    )
    table.add_row("next-token KL, p99", f"{forced.kl_p99:.3e}", f"<= {bounds.max_kl_p99:g}")
    sure = forced.confident_top1_agreement
    table.add_row(
        f"top-1 agreement where PyTorch is sure ({forced.confident_positions})",
        "n/a" if sure is None else f"{sure:.3f}",
        f">= {bounds.min_top1_agreement:g}",
    )
    table.add_row(
        "Δp of the answer token, mean / worst", f"{forced.delta_p_mean:+.4f} / {forced.delta_p_min:+.4f}", "reported"
    )
    if report.decoder_only and report.end_to_end is not None:
        table.add_row("next-token KL, mean, end to end (our prompt)", f"{report.end_to_end.kl_mean:.3e}", "reported")
    vision = thresholds_for(report.vision_precision).min_token_cosine
    worst = report.worst_token_cosine
    table.add_row(
        "prompt vs PyTorch's, worst position cosine",
        "not recorded (a large model's prompts)" if worst is None else f"{worst:.5f}",
        f">= {vision:g}",
    )
    return table
