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
