"""Terminal presentation (rich): step progress for long work and the parity table.

The pipeline reports through :class:`Steps`; a library caller can pass :data:`SILENT`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ccra_export.core.lm_quality import bounds_for as lm_bounds
from ccra_export.core.parity import LanguageModelReport, ParityReport


class Steps:
    """Named steps with a live spinner and elapsed time; each finished step stays as one line."""

    def __init__(self, console: Console | None) -> None:
        self.console = console

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        """Yields ``update(text)``: shows a sub-status (e.g. TensorRT's build phase) on the spinner."""
        if self.console is None:
            yield lambda _text: None
            return
        start = time.perf_counter()
        title = escape(title)  # paths and flags like [export] are text, not rich markup
        with self.console.status(f"{title}...", spinner="dots") as status:
            yield lambda text: status.update(f"{title}: {escape(text)}")
        self._done(title, start)

    @contextlib.contextmanager
    def progress(self, title: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        """A progress bar over ``total`` items; yields ``advance(n)``."""
        if self.console is None:
            yield lambda _n: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        start = time.perf_counter()
        title = escape(title)
        # off a terminal a bar is noise (and a transient one leaves a blank line): the done line says it
        with Progress(*columns, console=self.console, transient=True, disable=not self.console.is_terminal) as bar:
            task = bar.add_task(title, total=total)
            yield lambda n: bar.advance(task, n)
        self._done(title, start)

    def info(self, line: str) -> None:
        """One line of plain text (escaped: paths and flags such as [export] are not markup)."""
        if self.console is not None:
            self.console.print(escape(line), highlight=False, soft_wrap=True)

    def warn(self, line: str) -> None:
        """Like ``info``, after a yellow ``warning:`` label."""
        if self.console is not None:
            self.console.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)

    def _done(self, title: str, start: float) -> None:
        """A finished step's line; soft-wrapped, so a pipe or a log gets it whole on one line."""
        if self.console is not None:
            self.console.print(
                f"[green]✓[/green] {title} [dim]({time.perf_counter() - start:.1f} s)[/dim]", soft_wrap=True
            )


SILENT = Steps(None)


def titled(title: str) -> Table:
    """A table at least as wide as its title, so the title is never broken mid-phrase."""
    return Table(title=escape(title), title_justify="left", min_width=len(title) + 2)


def parity_table(report: ParityReport, title: str = "Parity vs PyTorch") -> Table:
    table = titled(f"{title} ({report.precision}, {report.backend})")
    columns = ("output", "shape", "max abs err", "max rel err", "abs err / scale", "cosine", "worst token", "NaN/Inf")
    for column in (*columns, "result"):
        table.add_column(column, justify="left" if column in ("output", "shape", "result") else "right")
    rows = [(o.name, o) for o in report.outputs]  # a split bundle: end to end, then each graph alone
    rows += [(f"{graph}: {o.name}", o) for graph, outputs in (report.graphs or {}).items() for o in outputs]
    for label, o in rows:
        result = "[green]pass[/green]" if o.passed else f"[red]FAIL[/red] {'; '.join(o.failures)}"
        table.add_row(
            escape(label),
            "x".join(map(str, o.shape)),
            f"{o.max_abs_err:.3e}",
            f"{o.max_rel_err:.3e}",
            f"{o.scaled_max_abs_err:.3e}",
            f"{o.cosine:.7f}",
            "" if o.worst_token_cosine is None else f"{o.worst_token_cosine:.5f}",
            str(o.nonfinite),
            result,
        )
    return table


def layer_table(report: ParityReport) -> Table:
    """INT8 per-layer drift against the FP32 graph; the first layer under the threshold is marked."""
    table = titled("INT8 drift per layer vs the FP32 graph")
    for column in ("tap", "cosine", "abs err / scale", "note"):
        table.add_column(column, justify="left" if column in ("tap", "note") else "right")
    for row in report.layers or []:
        mark = "[red]first to drift below threshold[/red]" if row.label == report.first_drift else ""
        table.add_row(row.label, f"{row.cosine:.6f}", f"{row.scaled_max_abs_err:.3e}", mark)
    return table


def lm_table(figures: LanguageModelReport) -> Table:
    """The language model against Hugging Face (and, in `check`, against the build's own run)."""
    logits, steps = figures["first_token_logits"], figures["greedy_steps"]
    title = f"Language model vs transformers FP32 ({figures['device']} decoder on {figures['ran_on']})"
    table = titled(title)
    for column in ("check", "value", "bound"):
        table.add_column(column, justify="left" if column == "check" else "right")
    forced = figures.get("next_token")
    if forced is not None:
        limit = lm_bounds(figures["precision"], figures.get("kv_cache", "fp")) if "precision" in figures else None
        rows = (
            ("next-token KL, mean", f"{forced['kl_mean']:.3e}", limit and f"<= {limit.max_kl_mean:g}"),
            ("next-token KL, p99", f"{forced['kl_p99']:.3e}", limit and f"<= {limit.max_kl_p99:g}"),
            ("next-token KL, max", f"{forced['kl_max']:.3e}", None),
            ("top-1 agreement, all positions", f"{forced['top1_agreement']:.3f}", None),
            (
                f"top-1 agreement where the reference is sure ({forced.get('confident_positions', 0)})",
                "n/a"
                if forced.get("confident_top1_agreement") is None
                else f"{forced['confident_top1_agreement']:.3f}",
                limit and f">= {limit.min_top1_agreement:g}",
            ),
            (
                "Δp of the next token, mean / worst",
                f"{forced['delta_p_mean']:+.4f} / {forced['delta_p_min']:+.4f}",
                None,
            ),
        )
        for label, value, bound in rows:
            table.add_row(f"{label} (teacher-forced, {forced['positions']} positions)", value, bound or "reported")
    else:
        table.add_row("teacher-forced next-token figures", "not recorded (bundle built before them)", "")
    fp32 = figures.get("precision") == "fp32"
    table.add_row("first-token logits cosine", f"{logits['cosine']:.7f}", "reported")
    table.add_row("first-token logits max abs err", f"{logits['max_abs_err']:.3e}", "reported")
    table.add_row(
        "greedy tokens agreeing", f"{figures['tokens_agreeing']}/{steps}", "all (fp32)" if fp32 else "reported"
    )
    table.add_row("identical prefix", f"{figures['identical_prefix']}/{steps}", "reported")
    built = figures.get("built")
    if built is not None:
        same = "yes" if built["tokens"] == figures["tokens"] else "[red]no[/red]"
        table.add_row(f"build-time tokens reproduced (built on {built['ran_on']})", same, "same device class")
        table.add_row("build-time first-token cosine", f"{built['first_token_logits']['cosine']:.7f}", "±1e-4")
    return table
