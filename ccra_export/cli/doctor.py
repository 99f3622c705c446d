"""`ccra-export doctor`."""

from __future__ import annotations

import dataclasses
import json

import click
from rich.markup import escape
from rich.table import Table

from ccra_export.cli.output import reports_errors, stdout
from ccra_export.workflows.doctor import run_checks


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@reports_errors
def doctor(as_json: bool) -> None:
    """Report what is installed and usable: ONNX Runtime providers, TensorRT, GPU, Jetson/JetPack,
    CUDA toolkit, the LPWCA libraries; with the fix for each missing piece."""

    checks = run_checks()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
        return
    table = Table(title="ccra-export doctor", title_justify="left")
    for column in ("", "component", "status", "fix"):
        table.add_column(column, overflow="fold")  # a path is wrapped whole, never cut to an ellipsis
    for c in checks:
        table.add_row("[green]✓[/green]" if c.ok else "[red]✗[/red]", c.component, escape(c.detail), escape(c.fix))
    stdout.print(table)
