"""Terminal output: user text is never read as rich markup, and warnings are labelled, not tagged."""

from __future__ import annotations

from rich.console import Console

from ccra_export.core.console import Steps


def _printed(call: str, text: str) -> str:
    console = Console(record=True, width=200, color_system=None)
    getattr(Steps(console), call)(text)
    return console.export_text()


def test_info_prints_brackets_as_text():
    assert _printed("info", "install the [export] extra") == "install the [export] extra\n"


def test_warn_labels_without_showing_markup():
    printed = _printed("warn", "3 calibration images for --calib-batch-size 4 [one batch]")
    assert printed == "warning: 3 calibration images for --calib-batch-size 4 [one batch]\n"
    assert "[yellow]" not in printed


def test_doctor_piped_shows_every_path_whole():
    """Off a terminal the table is 160 columns: a long path wraps, it is never cut to an ellipsis."""
    import subprocess
    import sys

    from ccra_export.workflows.doctor import run_checks

    result = subprocess.run(
        [sys.executable, "-m", "ccra_export.cli", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    printed = "".join(line.split("│")[3].strip() for line in result.stdout.splitlines() if line.count("│") >= 4)
    for check in run_checks():
        assert check.detail.replace(" ", "") in printed.replace(" ", "")


def test_off_a_terminal_lines_are_whole_and_a_progress_bar_leaves_no_blank_line():
    import io

    buffer = io.StringIO()
    steps = Steps(Console(file=buffer, width=60, color_system=None, soft_wrap=True))
    with steps.progress("Calibrating vision_tower.onnx", 3, "images") as advance:
        advance(3)
    steps.info("LPWCA: portable " + "word " * 30)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("✓ Calibrating vision_tower.onnx (")
    assert lines[1].count("word") == 30  # one line, not wrapped at 60 columns


def test_a_narrow_table_keeps_its_title_on_one_line():
    from ccra_export.core.console import titled

    table = titled("Language model vs transformers FP32 (cpu decoder on cpu)")
    for column in ("check", "value"):
        table.add_column(column)
    table.add_row("top-1", "1.0")
    console = Console(record=True, width=130, color_system=None)
    console.print(table)
    assert "Language model vs transformers FP32 (cpu decoder on cpu)" in console.export_text().splitlines()[0]


def test_the_cli_consoles_soft_wrap_text():
    from ccra_export.cli.output import stderr, stdout

    assert stdout.soft_wrap and stderr.soft_wrap
