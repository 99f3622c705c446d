"""A bundle is a trust boundary: every command that reads one refuses a bad one in one line.

Each tampering below is applied to a copy of a real bundle (CCRA + language model) and run
through every command that reads a bundle, and through ``Pipeline.from_bundle``. Expected: exit
code 2, one ``error:`` line that names the bundle's file or key, no traceback; and no file
outside the bundle is ever opened because the manifest (or genai_config.json) pointed there: the
files they point to sit in a per-case ``canary`` directory, and the suite is re-run once under
``strace`` to prove nothing under any canary directory was opened, by Python or by the native
libraries (ONNX Runtime, tokenizers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.errors import CCRAExportError

IMAGE = Path(__file__).resolve().parents[1] / "docs" / "explain_example.png"

#: every way a user opens a bundle (the engine verb refuses before it needs TensorRT)
COMMANDS: dict[str, list[str]] = {
    "check": ["check"],
    "check-recorded": ["check", "--reference", "recorded"],
    "run": ["run", "--image", str(IMAGE), "--prompt", "What is this?", "--max-new-tokens", "2"],
    "run-verify": ["run", "--verify", "--image", str(IMAGE), "--prompt", "What is this?", "--max-new-tokens", "2"],
    "bench": ["bench", "--max-new-tokens", "2", "--repeats", "1"],
    "bench-vision-only": ["bench", "--vision-only", "--repeats", "1"],
    "engine": ["engine"],
    "Pipeline.from_bundle": [],
}

Tamper = Callable[[Path, dict, Path], None]  # (bundle copy, its manifest to edit, canary dir)


def _size(bundle: Path, manifest: dict, name: str) -> None:
    """An attacker can rewrite the manifest too: keep the recorded size in step with an edit."""
    manifest["files"][name]["bytes"] = (bundle / name).stat().st_size


def _canary_copy(bundle: Path, canary: Path, name: str) -> Path:
    """A genuine copy of a bundle file outside the bundle: following the pointer would 'work'."""
    target = canary / Path(name).name
    shutil.copy(bundle / name, target)
    return target


#: the CCRA bundle is split by default: the tower's graph and CCRA's head are the graph files
TOWER, HEAD = "vision_tower.onnx", "ccra_head.onnx"


def _graph(manifest: dict, index: int) -> dict:
    """The manifest's record of graph ``index`` (a split bundle's tower or head)."""
    return manifest["graph"]["parts"][index]


def graph_absolute(bundle, manifest, canary):
    _graph(manifest, 0)["file"] = str(_canary_copy(bundle, canary, TOWER))


def graph_dotdot(bundle, manifest, canary):
    _canary_copy(bundle, canary, HEAD)
    _graph(manifest, 1)["file"] = f"../{canary.name}/{HEAD}"


def files_absolute(bundle, manifest, canary):
    target = _canary_copy(bundle, canary, TOWER)
    manifest["files"][str(target)] = manifest["files"][TOWER]


def reference_outside(bundle, manifest, canary):
    manifest["reference"]["file"] = str(_canary_copy(bundle, canary, "reference.npz"))


def graph_symlink_out(bundle, manifest, canary):
    target = _canary_copy(bundle, canary, HEAD)
    (bundle / HEAD).unlink()
    (bundle / HEAD).symlink_to(target)


def decoder_symlink_out(bundle, manifest, canary):
    target = _canary_copy(bundle, canary, "lm/decoder/model.onnx")
    (bundle / "lm/decoder/model.onnx").unlink()
    (bundle / "lm/decoder/model.onnx").symlink_to(target)


def genai_decoder_outside(bundle, manifest, canary):
    target = _canary_copy(bundle, canary, "lm/decoder/model.onnx")
    _canary_copy(bundle, canary, "lm/decoder/model.onnx.data")
    _edit_genai(bundle, manifest, lambda model: model["decoder"].__setitem__("filename", str(target)))


def _edit_genai(bundle, manifest, edit):
    path = bundle / "lm/decoder/genai_config.json"
    config = json.loads(path.read_text())
    edit(config["model"])
    path.write_text(json.dumps(config))
    _size(bundle, manifest, "lm/decoder/genai_config.json")


def genai_absurd_layers(bundle, manifest, canary):
    _edit_genai(bundle, manifest, lambda model: model["decoder"].__setitem__("num_hidden_layers", 10**9))


def genai_context_string(bundle, manifest, canary):
    _edit_genai(bundle, manifest, lambda model: model.__setitem__("context_length", "2048"))


def missing_key(bundle, manifest, canary):
    del manifest["graph"]


def files_as_list(bundle, manifest, canary):
    manifest["files"] = list(manifest["files"])


def unknown_format_version(bundle, manifest, canary):
    manifest["format_version"] = 99


def nan_threshold(bundle, manifest, canary):
    manifest["parity"]["thresholds"]["min_cosine"] = float("nan")  # json.dumps writes the NaN literal


def huge_threshold(bundle, manifest, canary):
    manifest["parity"]["thresholds"]["max_scaled_abs_err"] = 1e400  # Infinity


def batch_as_string(bundle, manifest, canary):
    manifest["dynamic_axes"]["batch"]["max"] = "8"


def negative_image_size(bundle, manifest, canary):
    manifest["image_processor"]["crop_height"] = -224


def _truncate(name: str) -> Tamper:
    def tamper(bundle, manifest, canary):
        path = bundle / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    tamper.__name__ = f"truncated {name}"
    return tamper


def _scramble(name: str) -> Tamper:
    """Same size, different bytes: only a hash or the loader can tell (run without --verify loads it)."""

    def tamper(bundle, manifest, canary):
        path = bundle / name
        data = bytearray(path.read_bytes())
        data[: min(64, len(data))] = b"}" * min(64, len(data))
        path.write_bytes(bytes(data))

    tamper.__name__ = f"scrambled {name}"
    return tamper


#: tamperings whose point is a pointer out of the bundle (checked with strace as well)
ESCAPES = [
    graph_absolute,
    graph_dotdot,
    files_absolute,
    reference_outside,
    graph_symlink_out,
    decoder_symlink_out,
    genai_decoder_outside,
]
MALFORMED = [
    missing_key,
    files_as_list,
    unknown_format_version,
    nan_threshold,
    huge_threshold,
    batch_as_string,
    negative_image_size,
    genai_absurd_layers,
    genai_context_string,
]
CORRUPT = [
    _truncate(TOWER),
    _truncate("lm/decoder/model.onnx.data"),
    _truncate("lm/embed.onnx"),
    _scramble(HEAD),
    _scramble("lm/embed.onnx"),
    _scramble("lm/decoder/model.onnx"),
    _scramble("lm/decoder/tokenizer.json"),
    _scramble("lm/decoder/genai_config.json"),
    _scramble("reference.npz"),
]
TAMPERINGS = ESCAPES + MALFORMED + CORRUPT

#: tamperings of files only the language model reads, and of the recorded reference
LANGUAGE_MODEL_ONLY = {genai_decoder_outside, genai_absurd_layers, genai_context_string}
LANGUAGE_MODEL_ONLY |= {t for t in CORRUPT if "lm/" in t.__name__ and "truncated" not in t.__name__}
REFERENCE_ONLY = {CORRUPT[-1]}


def reads_it(command: str, tamper: Tamper) -> bool:
    """Whether ``command`` reads what ``tamper`` broke. Commands that re-hash (check, run --verify,
    engine) read every file; the size check on load catches every truncation and every pointer
    out of the bundle; otherwise a command meets a corrupt file only when it loads it."""
    if command == "bench-vision-only" and tamper in LANGUAGE_MODEL_ONLY:
        return False
    return not (command in ("run", "bench", "Pipeline.from_bundle") and tamper in REFERENCE_ONLY)


def tampered_copy(source: Path, root: Path, tamper: Tamper) -> Path:
    bundle, canary = root / "bundle", root / "canary"
    shutil.copytree(source, bundle)
    canary.mkdir()
    manifest = json.loads((bundle / "manifest.json").read_text())
    tamper(bundle, manifest, canary)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def invoke(command: str, bundle: Path) -> tuple[int, str]:
    """(exit code, everything printed); ``Pipeline.from_bundle`` counts as exit 2 when it raises
    a ``CCRAExportError`` (the CLI's one line) and as a crash for anything else."""
    if command == "Pipeline.from_bundle":
        from ccra_export.runtime.vlm_pipeline import Pipeline

        try:
            Pipeline.from_bundle(bundle).generate(IMAGE, "What is this?")
        except CCRAExportError as exc:
            return 2, f"error: {exc}"
        return 0, ""
    result = CliRunner().invoke(main, [*COMMANDS[command], "--bundle", str(bundle)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback: the test shows it
    return result.exit_code, result.output


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("tamper", TAMPERINGS, ids=lambda t: t.__name__.replace(" ", "-"))
def test_a_bad_bundle_is_one_line(tmp_path, ccra_bundle, tamper, command):
    bundle = tampered_copy(ccra_bundle, tmp_path, tamper)
    code, output = invoke(command, bundle)
    if not reads_it(command, tamper):  # it runs, untouched by what it does not read
        assert code == 0 and "Traceback" not in output, output
        return
    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    error = errors[0]
    if tamper in ESCAPES + MALFORMED:  # the message names the manifest / config entry or the file
        assert "manifest.json" in error or "genai_config.json" in error or "outside the bundle" in error, error
    else:
        name = tamper.__name__.split(" ", 1)[1]
        assert name in error, error


def test_nothing_outside_the_bundle_is_opened(tmp_path, ccra_bundle):
    """Every escape through every command, in one process under strace: no open() of a canary file."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: the in-process checks above still ran")
    cases = []
    for tamper in ESCAPES:
        root = tmp_path / tamper.__name__
        root.mkdir()
        cases.append(str(tampered_copy(ccra_bundle, root, tamper)))
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from tests.test_bundle_trust import COMMANDS, invoke
        from pathlib import Path
        for bundle in {cases!r}:
            for command in COMMANDS:
                code, output = invoke(command, Path(bundle))
                assert code in (0, 2), (bundle, command, output)  # which: test_a_bad_bundle_is_one_line
        print("ran", len({cases!r}) * len(COMMANDS))
        """
    )
    log = tmp_path / "strace.log"
    probe = subprocess.run(["strace", "-qq", "-o", os.devnull, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here ({probe.stderr.decode().strip()[:100]})")
    result = subprocess.run(
        ["strace", "-f", "-qq", "-y", "-e", "trace=open,openat,openat2", "-o", str(log), sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ran {len(ESCAPES) * len(COMMANDS)}" in result.stdout
    opened = [line for line in log.read_text().splitlines() if "/canary/" in line and "ENOENT" not in line]
    assert opened == [], opened[:5]
    # the canary files exist and the tracer saw the bundle files being opened: the probe can see
    assert any("/bundle/manifest.json" in line for line in log.read_text().splitlines())


def test_a_sound_copy_still_runs(tmp_path, ccra_bundle):
    """The control: the same copy step with no tampering passes every command that can run here."""
    bundle = tmp_path / "bundle"
    shutil.copytree(ccra_bundle, bundle)
    for command in ("check-recorded", "run-verify", "Pipeline.from_bundle"):
        code, output = invoke(command, bundle)
        assert code == 0, (command, output)
