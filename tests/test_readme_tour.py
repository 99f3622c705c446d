"""The README's tour, run as written on the demo bundle its main command builds, answers checked."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python)\n(.*?)```", text, re.S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_main_command_builds_the_bundle_the_tour_uses():
    main_job = _blocks(_section("Set up"))[0][1].strip()
    build = main_job.split(" && ")[-1]
    assert shlex.split(build) == [
        "ccra-export",
        *"build --model demo --precision fp16 --lm-precision int4 --output out/demo".split(),
    ]


def test_tour_runs_as_written_and_answers_right(tmp_path, demo_bundle):
    """Every block of "Five minutes with the demo", in order, in one shell: the server on a free port."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "demo").symlink_to(demo_bundle)
    (tmp_path / "ccra_export").symlink_to(ROOT / "ccra_export")
    port = str(_free_port())
    script = ["set -euo pipefail", f'export PATH="{Path(sys.executable).parent}:$PATH"']
    for index, (kind, body) in enumerate(_blocks(_section("Five minutes with the demo"))):
        body = body.replace("8000", port)
        if kind == "python":
            (tmp_path / f"block{index}.py").write_text(body)
            script.append(f"timeout 120 {shlex.quote(sys.executable)} block{index}.py")
        else:
            script.append(body)
    script.append("wait")  # the server, stopped by the tour's kill, has let go of the output
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line.strip() for line in result.stdout.splitlines()]
    # shapes_7_00003.png: a blue square, circle and triangle (its questions.jsonl)
    assert "blue" in lines  # What color is the circle?
    assert "three" in lines[lines.index("blue") :] and "no" in lines[lines.index("blue") :]  # the chat
    assert (tmp_path / "out" / "why" / "overlay.png").is_file()
    assert "parity passed" in result.stdout + result.stderr  # check
    assert "yes" in lines[lines.index("no") + 1 :], lines[-20:]  # the openai client: "Is there a blue triangle?"


@pytest.mark.parametrize("script", ["docs/explain_example.py"])
def test_docs_scripts_run(script, tmp_path):
    command = [sys.executable, str(ROOT / script), "--out", str(tmp_path / "picture.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "-> 'blue'" in result.stdout and (tmp_path / "picture.png").is_file(), result.stdout
