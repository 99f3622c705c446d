"""Presentation shared by the verbs: the two consoles, one-line errors and the parity verdict."""

from __future__ import annotations

import functools
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from ccra_export.core.errors import CCRAExportError, Remedy
from ccra_export.core.parity import ParityReport

# Off a terminal (CI logs, pipes) rich falls back to 80 columns, too narrow for the parity table (160 fits it).
# Lines of text are soft-wrapped (a pipe or a log gets each whole, for grep); tables keep the width.
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 160, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160, soft_wrap=True)


#: the signals that end a command the way Ctrl-C does: `kill`, `timeout`, systemd, `docker stop`; a closed terminal
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the main thread is, like Ctrl-C's ``KeyboardInterrupt``.

    A subclass of it on purpose: every cleanup written for Ctrl-C (``except BaseException`` in
    ``core.atomic``, ``finally`` around the model-builder subprocess) runs for these too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """While the CLI runs, turn SIGTERM/SIGHUP into ``Terminated``; restore the handlers after.

    A signal that was ignored when the CLI started (``nohup``, a parent's SIG_IGN) stays ignored.
    After the first one the default action is back: a second signal ends the process at once,
    skipping the cleanup (as a second Ctrl-C interrupts it), so nothing that swallowed the first
    can leave the process unkillable. Only the main thread can install handlers; elsewhere this
    is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in TERMINATING_SIGNALS}
    caught = [sig for sig, old in previous.items() if old is not signal.SIG_IGN]

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig in caught:
            signal.signal(sig, signal.SIG_DFL)
        raise Terminated(signum)

    for sig in caught:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def flag_name(field: str) -> str | None:
    """The running verb's name for a domain field: its option (``--max-new-tokens``) or argument
    (``IMAGE``); None when the verb has no such input."""
    context = click.get_current_context(silent=True)
    spelled = "--" + field.replace("_", "-")
    for param in context.command.params if context is not None else ():
        if param.name == field or spelled in getattr(param, "opts", ()):
            if isinstance(param, click.Option):
                return max(param.opts, key=len)
            return param.human_readable_name
    return None


def command_line(remedy: Remedy) -> str:
    """A remedy as the command that applies it: ``ccra-export engine --bundle B --force``."""
    words = ["ccra-export", *remedy.step.split(), *([] if remedy.complete else ["..."])]
    for name, value in remedy.options:
        words.append("--" + name.replace("_", "-"))
        if value is not True:
            words.append(str(value))
    return f"`{shlex.join(words)}`"


def error_line(error: CCRAExportError) -> str:
    """The one line the CLI prints for a domain error: fields as flags, remedies as commands."""
    return error.render(flag_name, command_line)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user-facing error into one line on stderr and its exit code, never a traceback.

    Ctrl-C exits 130; SIGTERM/SIGHUP (``Terminated``) exit 128 + the signal number (143, 129),
    the status a shell reports for a process that signal killed, after the same cleanup."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CCRAExportError as exc:
            stderr.print(f"[bold red]error:[/bold red] {escape(error_line(exc))}", soft_wrap=True)
            sys.exit(exc.exit_code)
        except Terminated as exc:
            stderr.print(f"[bold red]terminated[/bold red] ({exc.args[0]}): nothing was written")
            sys.exit(128 + exc.signum)
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
