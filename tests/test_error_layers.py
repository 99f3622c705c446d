"""Errors speak their layer (shared/DESIGN.md): below `cli/` an error names its input by the domain's
name and never by a command-line flag; the CLI renders the flag, the server the request field."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
from click.testing import CliRunner

from ccra_export.cli.output import error_line, reports_errors
from ccra_export.core.errors import BundleError, CCRAExportError, Remedy, no_language_model
from ccra_export.runtime.language_model import Sampling, SamplingError
from ccra_export.serve.openai.protocol import refused

ROOT = Path(__file__).resolve().parents[1]
#: every source folder of the package except cli/, which alone speaks flags
LAYERS = [
    ROOT / "ccra_export" / "core",
    ROOT / "ccra_export" / "model",
    ROOT / "ccra_export" / "workflows",
    ROOT / "ccra_export" / "demo",
    *(ROOT / stage for stage in ("export", "calibration", "engine", "runtime", "serve")),
]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def _error_texts(tree: ast.AST) -> list[tuple[int, str]]:
    """The string literals (f-string parts included) of every raised error and every error built
    by a call to a class named ``...Error`` (an error returned by a helper, then raised)."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            error = node.exc
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")).endswith("Error"):
            error = node
        else:
            continue
        for part in ast.walk(error):
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                found.add((part.lineno, part.value))
    return sorted(found)


def test_no_error_below_the_cli_names_a_flag():
    offenders = []
    for folder in LAYERS:
        for path in sorted(folder.rglob("*.py")):
            for line, text in _error_texts(ast.parse(path.read_text(), str(path))):
                if FLAG.search(text):
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not offenders, "errors below cli/ naming flags:\n" + "\n".join(offenders)


def test_the_scan_sees_a_flag_in_a_raised_f_string_and_in_a_returned_error():
    source = 'def f(x):\n    raise ConfigError(f"--opset {x}: no")\ndef g():\n    return InputError("use --image")\n'
    assert [line for line, text in _error_texts(ast.parse(source)) if FLAG.search(text)] == [2, 4]


def test_the_runtime_names_its_own_parameter_and_the_cli_its_flag():
    try:
        Sampling(max_new_tokens=0)
    except SamplingError as exc:
        error = exc
    assert str(error) == "max_new_tokens: 0; expected an integer >= 1"  # the Python API's keyword

    @click.command()
    @click.option("--max-new-tokens", "max_new_tokens", type=int)
    @reports_errors
    def generate(max_new_tokens: int) -> None:
        Sampling(max_new_tokens=max_new_tokens)

    result = CliRunner().invoke(generate, ["--max-new-tokens", "0"])
    assert result.exit_code == 2
    assert "--max-new-tokens: 0; expected an integer >= 1" in result.output


def test_a_remedy_is_a_command_line_in_the_cli_and_words_elsewhere():
    error = BundleError(
        "holds no TensorRT engine; build one on this GPU",
        field="bundle",
        value="b",
        remedy=Remedy("engine", (("bundle", "b"), ("force", True))),
    )

    @click.command()
    @click.option("--bundle")
    @reports_errors
    def verb(bundle: str) -> None:
        raise error

    assert "--bundle b: holds no TensorRT engine; build one on this GPU (`ccra-export engine --bundle b --force`)" in (
        CliRunner().invoke(verb, ["--bundle", "b"]).output
    )
    assert (
        str(error) == "bundle b: holds no TensorRT engine; build one on this GPU (the engine step with bundle=b, force)"
    )
    assert (
        "ccra-export build ... --lm-precision int4" in CliRunner().invoke(_raising(no_language_model("b")), []).output
    )


def _raising(error: CCRAExportError) -> click.Command:
    @click.command()
    @reports_errors
    def verb() -> None:
        raise error

    return verb


def test_outside_a_verb_a_field_keeps_its_domain_name():
    assert error_line(SamplingError("expected >= 1", field="max_new_tokens")) == "max_new_tokens: expected >= 1"


def test_the_server_names_request_fields():
    error = refused(SamplingError("expected >= 1", field="max_new_tokens"), messages=3)
    assert (error.status, error.param, error.message) == (400, "max_tokens", "max_tokens: expected >= 1")
    error = refused(CCRAExportError("empty", field="prompt", value="/secret/path"), messages=3)
    assert (error.param, error.message) == ("messages[2].content", "messages[2].content: empty")  # no value echoed
