"""Every ```bash and ```python block of README.md and docs/*.md runs, or says why it cannot here.

A block runs unless the line directly before its opening fence is one of these markers:

    <!-- needs: KIND[, KIND] -->   what this machine lacks, KIND one of NEEDS below (gpu, tensorrt, ...)
    <!-- slow: REASON -->          runs only with ``-m slow`` (a build of minutes), each such block alone
    <!-- not-run: REASON -->       cannot run as written (elided data, hours of training): the reason
    <!-- run-by: TEST -->          run by another test, which this file checks (the README's tour)

Each page's blocks run in order in one bash session, as a reader would type them (python blocks as
files), in a fresh folder that holds what the pages name: ``out/vlm`` and ``out/demo`` (a copy of
the demo bundle the tests share, ``demo_bundle``), ``photo.jpg`` and ``photos/`` (the demo's
example pictures), ``DIR`` (the demo's checkpoint) and ``ccra_export/`` (the package's files, for
the README's paths). Port 8000 becomes a free loopback port; a server a block starts is stopped
when the page ends, and the whole page is killed past its time limit. Marked blocks must still
parse (``bash -n``, ``compile``), and every fence names its language, so code cannot hide in an
untagged block.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = ("bash", "python")
#: fence languages that are not code to run here (a new one is a decision: add it, or tag the block)
NOT_CODE = ("text", "ini", "dockerfile")
#: what a ``needs:`` marker may name: things this machine and CI do not have
NEEDS = {
    "gpu": "a CUDA GPU (nvcc)",
    "tensorrt": "TensorRT",
    "jetson": "a Jetson (JetPack)",
    "network": "a package index: it installs packages",
    "docker": "Docker and NVIDIA's containers",
    "triton": "a running Triton Inference Server",
}
MARKER = re.compile(r"<!--\s*([a-z-]+):\s*(.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
PAGE_TIMEOUT = 420  # seconds for one page's blocks together
DEMO_PICTURE = ROOT / "ccra_export" / "demo" / "examples" / "shapes_7_00003.png"  # blue square, circle, triangle


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence
    lang: str
    body: str
    marker: tuple[str, str] | None  # (kind, value) of the marker line before the fence

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse_blocks(text: str, page: str) -> list[Block]:
    """Every fenced block of a markdown page, with the marker on the line before it (if any)."""
    blocks = []
    lines = text.splitlines()
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = lines[line - 2].strip() if line >= 2 else ""
        marker = MARKER.fullmatch(before)
        indent = len(match["indent"])
        body = "".join(row[indent:] if row[:indent].isspace() else row for row in match["body"].splitlines(True))
        blocks.append(Block(page, line, match["lang"].strip(), body, marker.groups() if marker else None))
    return blocks


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse_blocks(page.read_text(), page.relative_to(ROOT).as_posix())]


BLOCKS = all_blocks()


def marker_problem(block: Block) -> str | None:
    """Why a block's marker is not one of the convention's, or None."""
    if block.marker is None:
        return None
    kind, value = block.marker
    if block.lang not in RUNNABLE:
        return f"a {kind} marker on a {block.lang or 'untagged'} block, which never runs"
    if kind == "needs":
        unknown = [need for need in re.split(r"\s*,\s*", value) if need not in NEEDS]
        return f"needs what? {unknown} (known: {', '.join(NEEDS)})" if unknown or not value else None
    if kind in ("slow", "not-run"):
        return None if len(value) >= 10 else f"{kind}: give the reason, not {value!r}"
    if kind == "run-by":
        return None if value in RUN_BY else f"run-by {value!r}: no check knows that runner (known: {list(RUN_BY)})"
    return f"unknown marker {kind!r} (known: needs, slow, not-run, run-by)"


def _tour_blocks() -> list[str]:
    from tests import test_readme_tour as tour

    return [body for _, body in tour._blocks(tour._section("Five minutes with the demo"))]


#: what a ``run-by:`` marker may name, and the blocks that runner runs
RUN_BY = {"tests/test_readme_tour.py": _tour_blocks}


def default_blocks(page: str) -> list[Block]:
    return [b for b in BLOCKS if b.page == page and b.lang in RUNNABLE and b.marker is None]


RUN_PAGES = sorted({b.page for b in BLOCKS if b.lang in RUNNABLE and b.marker is None})
SLOW_BLOCKS = [b for b in BLOCKS if b.marker and b.marker[0] == "slow"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_sandbox(folder: Path, bundle: Path | None) -> Path:
    """A folder holding what the pages' blocks name (the module docstring lists it)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ccra_export").symlink_to(ROOT / "ccra_export")
    (folder / "DIR").symlink_to(ROOT / "ccra_export" / "demo" / "checkpoint")
    Image.open(DEMO_PICTURE).convert("RGB").save(folder / "photo.jpg", quality=95)
    photos = folder / "photos"
    photos.mkdir()
    for picture in sorted((ROOT / "ccra_export" / "demo" / "examples").glob("*.png")):
        shutil.copy(picture, photos / picture.name)
    (folder / "out").mkdir()
    if bundle is not None:  # a copy: no block can change the bundle other tests share
        shutil.copytree(bundle, folder / "out" / "vlm")
        (folder / "out" / "demo").symlink_to("vlm")
    return folder


def page_script(blocks: list[Block], folder: Path, port: int) -> str:
    """One bash session running ``blocks`` in order; python blocks run from files, each bounded."""
    script = [
        "set -euo pipefail",
        f'export PATH="{Path(sys.executable).parent}:$PATH"',
        "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT",  # a server a block started stops with the page
    ]
    for index, block in enumerate(blocks):
        body = block.body.replace("8000", str(port))
        script.append(f"echo '### {block.where}' >&2")
        if block.lang == "python":
            (folder / f"block{index}.py").write_text(body)
            script.append(f"timeout 300 {sys.executable} block{index}.py")
        else:
            script.append(body)
    return "\n".join(script) + "\n"


def run_script(script: str, folder: Path, timeout: float = PAGE_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``script`` in its own process group, killed whole past ``timeout`` (servers included)."""
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=folder,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n### killed after {timeout} s"
        return subprocess.CompletedProcess(process.args, -9, stdout, stderr)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def failure(result: subprocess.CompletedProcess) -> str:
    """The block that failed (its ### line) and what it printed."""
    last = [line for line in result.stderr.splitlines() if line.startswith("### ")][-1:]
    return (
        f"exit {result.returncode} in {last}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-4000:]}"
    )


#: what each page's blocks must leave behind (beyond exit 0), so a block that silently does nothing fails
EXPECTED_FILES = {
    "docs/demo.md": ["out/shapes/questions.jsonl", "out/shapes/shapes_1_00099.png"],
    "docs/explain.md": ["out/why/overlay.png", "out/why/attention.json", "out/map.png"],
    "docs/triton.md": ["out/triton/ccra_vlm/config.pbtxt", "out/triton/ccra_vlm/1/model.py"],
}
EXPECTED_OUTPUT = {
    "docs/serving.md": ['"object":"chat.completion"'],  # the curl block's reply
    "docs/explain.md": ["'top_patches'"],  # the Python block's summary()
}


# --- the convention itself ---------------------------------------------------------------------


def test_every_fence_names_a_known_language():
    bad = [f"{b.where}: {b.lang or 'untagged'}" for b in BLOCKS if b.lang not in RUNNABLE + NOT_CODE]
    assert not bad, "tag these blocks (bash/python run; text/ini/dockerfile do not):\n" + "\n".join(bad)


def test_every_marker_is_one_of_the_convention():
    problems = [f"{b.where}: {p}" for b in BLOCKS if (p := marker_problem(b))]
    for page in PAGES:  # a marker that drifted away from its fence would silently stop applying
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            following = lines[number] if number < len(lines) else ""
            if MARKER.fullmatch(line.strip()) and not following.lstrip().startswith("```"):
                problems.append(f"{page.relative_to(ROOT)}:{number}: a marker not directly before a fence")
    assert not problems, "\n".join(problems)


def test_marked_blocks_still_parse(tmp_path):
    """A block that cannot run here can still rot into a syntax error: not this way."""
    for block in BLOCKS:
        if block.marker is None or block.lang not in RUNNABLE:
            continue
        if block.lang == "python":
            compile(block.body, block.where, "exec")
        else:
            result = subprocess.run(["bash", "-n"], input=block.body, capture_output=True, text=True)
            assert result.returncode == 0, f"{block.where}: {result.stderr}"


def test_run_by_markers_are_exactly_what_their_runner_runs():
    for runner, blocks_it_runs in RUN_BY.items():
        marked = [b.body.strip() for b in BLOCKS if b.marker == ("run-by", runner)]
        assert marked and marked == [body.strip() for body in blocks_it_runs()], runner


def test_the_parser_sees_markers_indented_fences_and_untagged_blocks():
    page = (
        "text\n\n<!-- needs: gpu -->\n```bash\nnvidia-smi\n```\n\n"
        "1. step\n\n   <!-- not-run: elided bytes, on purpose -->\n   ```python\n   x = [1, ...]\n   ```\n\n"
        "```\nuntagged\n```\n"
    )
    gpu, listed, untagged = parse_blocks(page, "p.md")
    assert (gpu.lang, gpu.body, gpu.marker) == ("bash", "nvidia-smi\n", ("needs", "gpu"))
    assert (listed.lang, listed.body, listed.marker) == (
        "python",
        "x = [1, ...]\n",
        ("not-run", "elided bytes, on purpose"),
    )
    assert untagged.lang == "" and untagged.marker is None
    assert marker_problem(Block("p.md", 1, "bash", "", ("needs", "cuda"))) is not None
    assert marker_problem(Block("p.md", 1, "bash", "", ("skip", "because"))) is not None
    assert marker_problem(Block("p.md", 1, "bash", "", ("not-run", ""))) is not None


def test_an_unmarked_block_that_fails_fails_its_page(tmp_path):
    """The runner reports the block that broke, and stops a server an earlier block left running."""
    page = (
        "```bash\nsleep 300 &\necho $! > server.pid\n```\n\n"
        "```python\nraise SystemExit(3)\n```\n\n"
        "```bash\necho never\n```\n"
    )
    result = run_script(page_script(parse_blocks(page, "docs/broken.md"), tmp_path, _free_port()), tmp_path, timeout=60)
    assert result.returncode == 3 and "never" not in result.stdout
    assert "### docs/broken.md:6" in failure(result)
    server = int((tmp_path / "server.pid").read_text())
    with pytest.raises(ProcessLookupError):  # stopped and reaped by the page's shell
        os.kill(server, 0)


# --- running them ------------------------------------------------------------------------------


@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_blocks_run(page, tmp_path, demo_bundle):
    if any("curl " in b.body for b in default_blocks(page)) and shutil.which("curl") is None:
        pytest.skip(f"curl is not installed here, and {page}'s blocks call it")
    folder = make_sandbox(tmp_path / "reader", demo_bundle)
    result = run_script(page_script(default_blocks(page), folder, _free_port()), folder)
    assert result.returncode == 0, failure(result)
    assert "Traceback" not in result.stderr, failure(result)
    missing = [name for name in EXPECTED_FILES.get(page, []) if not (folder / name).is_file()]
    assert not missing, f"{page}: ran, but did not write {missing}\n{failure(result)}"
    for text in EXPECTED_OUTPUT.get(page, []):
        assert text in result.stdout.replace(" ", ""), f"{page}: no {text!r} in its output\n{failure(result)}"


@pytest.mark.slow  # builds (a minute or more each): the marker on each block says how long
@pytest.mark.parametrize("block", SLOW_BLOCKS, ids=lambda b: b.where)
def test_slow_block_runs(block, tmp_path):
    folder = make_sandbox(tmp_path / "reader", None)  # no bundle: the block builds its own
    result = run_script(page_script([block], folder, _free_port()), folder, timeout=900)
    assert result.returncode == 0, failure(result)
    assert "Traceback" not in result.stderr, failure(result)
