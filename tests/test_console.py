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
