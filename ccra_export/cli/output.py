"""Presentation shared by the verbs: the two consoles, one-line errors and the parity verdict."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from ccra_export.core.errors import CCRAExportError
from ccra_export.core.parity import ParityReport

# Off a terminal (CI logs, pipes) rich falls back to 80 columns, too narrow for the parity table.
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 130)
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 130)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user-facing error into one line on stderr and its exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CCRAExportError as exc:
            stderr.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            stderr.print("[bold red]interrupted[/bold red]: nothing was written")
            sys.exit(130)

    return wrapper


def finish(report: ParityReport) -> None:
    """Exit 0 when parity passed, else 3 with the failures in one line."""
    if report.passed:
        stdout.print("[green]parity passed[/green]")
        return
    stderr.print(f"[bold red]parity FAILED:[/bold red] {escape(report.failure_summary())}", soft_wrap=True)
    sys.exit(3)
