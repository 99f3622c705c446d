"""Every benchmark in bench/ still runs: one round on the smallest sizes, as a process, as a user
would start it. Not a speed check (nothing here asserts a time): a benchmark that crashes, or
whose reference and subject stop computing the same thing, fails here instead of in a release."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = {
    "vision": ["--presets", "tiny", "--batches", "1", "--repeats", "2", "--peak-s", "0.3"],
    "int8": ["--presets", "tiny", "--repeats", "1"],
    "lpwca": ["--presets", "tiny", "--repeats", "1"],
    "split_vision": ["--preset", "tiny", "--repeats", "1"],
    "lm_decode": ["--size", "small", "--contexts", "64", "--steps", "2", "--repeats", "1", "--skip-hf"],
    "serve": ["--sizes", "small", "--clients", "1,2", "--requests", "2", "--tokens", "2", "--repeats", "1"],
    "lm_quant": ["--model", "small", "--recipes", "rtn", "--questions", "0", "--steps", "4", "--repeats", "1"],
    "prefill": ["--size", "small", "--tokens", "64", "--repeats", "1"],
    "lm_batch": ["--size", "small", "--variants", "rtn:32", "--batches", "1,2", "--steps", "2", "--repeats", "1"],
}
#: the language-model benches export a decoder with the model builder (most of a minute each)
SLOW = {"lm_decode", "serve", "lm_quant", "prefill", "lm_batch"}


def test_every_script_in_bench_has_a_smoke_run():
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"flops"}  # flops.py: a helper module
    assert scripts == set(BENCHES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BENCHES])
def test_bench_runs_one_round(name, tmp_path):
    args = [*BENCHES[name], "--json", str(tmp_path / "figures.json")]
    if name in ("split_vision", "lm_quant"):
        args += ["--work", str(tmp_path / "work")]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures, "the benchmark wrote no figures"
