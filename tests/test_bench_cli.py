"""`ccra-export bench` on a bundle with a language model: without PyTorch it times the bundle alone,
every figure has its spread, `--max-new-tokens` is the one name (`--new-tokens` a hidden alias),
`--backend ort-trt` is offered, and out-of-range sizes are one line."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.runtime.vision_backend import available_providers
from ccra_export.workflows import bench
from ccra_export.workflows.bench import DEFAULT_REPEATS, Spread
from tests.torchless import run_cli

HAS_TRT_EP = "TensorrtExecutionProvider" in available_providers()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


DEPRECATED = "warning: --new-tokens is deprecated; use --max-new-tokens"


def one_line_error(result) -> str:
    """The error line; only warnings (the alias's, a busy machine's) may come before it."""
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Row label -> cells of the rich table (a wrapped label's first line)."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            if cells[0] and any(cells[1:]):  # not the continuation of a wrapped label
                rows[cells[0]] = cells[1:]
    return rows


def figures(cell: str) -> tuple[float, float, float]:
    """``12.3 (11.9–15.0)`` or ``4.10x (2.00–9.50)`` -> (median, min, max)."""
    median, low, high = re.fullmatch(r"([\d.]+)x? \(([\d.]+)–([\d.]+)\)", cell).groups()
    return float(median), float(low), float(high)


class TestSpread:
    def test_median_and_range(self):
        s = Spread.of([0.003, 0.001, 0.002, 0.010], 1e3)
        assert (s.median, s.low, s.high) == pytest.approx((2.5, 1.0, 10.0))

    def test_a_ratio_spans_the_extremes_of_both_sides(self):
        theirs, ours = Spread(100.0, 90.0, 400.0), Spread(2.0, 1.0, 4.0)
        ratio = theirs.over(ours)
        assert (ratio.median, ratio.low, ratio.high) == pytest.approx((50.0, 22.5, 400.0))


def test_a_busy_machine_is_said_before_the_run(monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (4.03, 3.75, 2.70))
    assert bench.busy_machine().startswith("load average 4.0 on 2 cores before the run")
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (0.4, 0.5, 0.6))
    assert bench.busy_machine() is None


@pytest.mark.parametrize("with_model", [True, False], ids=["with-model", "without-model"])
def test_without_torch_the_pipeline_is_timed_alone_and_one_line_says_why(ccra_bundle, ccra_checkpoint, with_model):
    model = ["--model", ccra_checkpoint] if with_model else []  # on a Jetson: torch is the reason either way
    result = run_cli("bench", "--bundle", ccra_bundle, *model, "--max-new-tokens", 3, "--repeats", 2)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    ours = next(cells for label, cells in rows.items() if label.startswith("ccra-export (ONNX Runtime"))
    # the bundle alone (vision + language model), and for a split bundle question 2 about the same image
    assert "Hugging Face" not in result.stdout
    assert set(rows) == {
        next(iter(rows)),
        "ccra-export, question 2 about the same image",
        "ratio (question 1 / question 2)",
    }
    for cell in ours[:3]:  # vision ms, first token ms, decode tok/s: median (min–max)
        median, low, high = figures(cell)
        assert 0 < low <= median <= high
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert skipped == [line for line in skipped if "PyTorch side skipped: PyTorch is not installed here" in line]
    assert len(skipped) == 1 and "Traceback" not in result.stderr
    assert "3 new tokens; median (min–max) of 2 timed rounds" in result.stdout


def test_with_the_checkpoint_both_sides_and_every_ratio_has_its_spread(ccra_bundle, ccra_checkpoint):
    result = invoke("bench", "--bundle", ccra_bundle, "--model", ccra_checkpoint, "--max-new-tokens", 3, "--repeats", 2)
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    assert "Hugging Face (PyTorch eager)" in rows
    ratio = rows["ratio (HF / ours; tok/s ours / HF)"]
    for cell in ratio[:3]:
        median, low, high = figures(cell)
        assert 0 < low <= median <= high


def test_without_model_the_checkpoint_is_not_opened_and_one_line_says_so(ccra_bundle):
    result = invoke("bench", "--bundle", ccra_bundle, "--max-new-tokens", 2, "--repeats", 1)
    assert result.exit_code == 0, result.output
    assert "Hugging Face" not in result.stdout
    assert "PyTorch side skipped: no --model: pass --model DIR" in result.stderr


def test_new_tokens_is_a_hidden_alias_that_still_works(ccra_bundle):
    help_text = invoke("bench", "--help").stdout
    assert "--max-new-tokens" in help_text and "--new-tokens" not in help_text.replace("--max-new-tokens", "")
    assert f"default: {DEFAULT_REPEATS}" in help_text
    result = invoke("bench", "--bundle", ccra_bundle, "--new-tokens", 3, "--repeats", 1)
    assert result.exit_code == 0, result.output
    assert "3 new tokens" in result.stdout
    assert DEPRECATED in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--new-tokens", "3", "--max-new-tokens", "4"], "--new-tokens 3 and --max-new-tokens 4: --new-tokens is the"),
        (["--max-new-tokens", "100000"], "new tokens exceed the context of"),
        (["--new-tokens", "100000"], "new tokens exceed the context of"),
        (["--vision-only", "--batch", "9"], "--batch 9: above 8, the largest batch of the bundle's profile"),
        (["--vision-only", "--batch", "1000000"], "--batch 1000000: above 8"),
        (["--batch", "2"], "--batch 2: only the vision-only bench takes a batch"),
        (["--model", "/nonexistent/ckpt"], "--model /nonexistent/ckpt: no such checkpoint directory"),
        (["--image", "/nonexistent.png"], "--image /nonexistent.png: no such file"),
    ],
)
def test_out_of_range_requests_are_one_line(ccra_bundle, args, message):
    result = invoke("bench", "--bundle", ccra_bundle, "--repeats", 1, *args)
    assert result.exit_code == 2, result.output
    assert message in one_line_error(result)


@pytest.mark.parametrize("verb", ["run", "bench"])
def test_ort_trt_is_offered_and_refused_in_one_line_without_the_provider(verb, ccra_bundle, tmp_path):
    from PIL import Image

    assert "ort-trt" in invoke(verb, "--help").stdout
    if HAS_TRT_EP:
        pytest.skip("this ONNX Runtime has the TensorRT provider")
    args = [verb, "--bundle", ccra_bundle, "--backend", "ort-trt"]
    if verb == "run":
        Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
        args += ["--image", tmp_path / "red.png", "--prompt", "What is it?"]
    for extra in ([], ["--vision-only"]) if verb == "bench" else ([],):
        result = invoke(*args, *extra)
        assert result.exit_code == 2, result.output
        assert "--backend ort-trt: this ONNX Runtime has no TensorrtExecutionProvider" in one_line_error(result)


def test_ort_trt_that_falls_back_to_another_provider_is_refused(monkeypatch, ccra_bundle):
    """onnxruntime-gpu lists the TensorRT provider even where libnvinfer is missing; the session then
    runs on CUDA or CPU with only a log line. Asked for ort-trt, that is refused, not timed as ort-trt."""
    from ccra_export.core.errors import BackendUnavailableError
    from ccra_export.core.manifest import read_manifest
    from ccra_export.workflows import backends

    class FellBack:
        providers = ("CPUExecutionProvider",)

    monkeypatch.setattr(backends, "resolve_backend", lambda kind: ("ort-trt", ""))
    monkeypatch.setattr(backends.ort_trt, "bundle_backend", lambda *args: (FellBack(), "backend: fell back"))
    with pytest.raises(BackendUnavailableError, match="lists TensorrtExecutionProvider but could not start it"):
        backends.open_bundle_backend(ccra_bundle, read_manifest(ccra_bundle), "ort-trt")
