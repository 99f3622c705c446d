"""Numbers and text are checked where they enter: the CLI, the Python API and the manifest.

A NaN threshold would pass any error (every comparison with NaN is False); a NaN temperature or
a top-p of 0 would sample from an empty set; a control token typed into a prompt would reach the
language model as the real token. Each is refused in one line, or given a documented meaning.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.errors import CCRAExportError, ConfigError
from ccra_export.core.parity import Thresholds
from ccra_export.core.plugin_library import check_plugin_library
from ccra_export.runtime.inputs import InputError, check_prompt
from ccra_export.runtime.language_model import Sampling, SamplingError

IMAGE = Path(__file__).resolve().parents[1] / "docs" / "explain_example.png"


def one_error(result) -> str:
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    return lines[-1]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--min-cosine", "nan"),
        ("--min-cosine", "inf"),
        ("--max-abs-err", "nan"),
        ("--max-abs-err", "-inf"),
        ("--seed", "-1"),
        ("--seed", str(2**64)),
    ],
)
@pytest.mark.parametrize("command", ["build", "check"])
def test_non_finite_thresholds_and_bad_seeds_are_refused_by_the_cli(tmp_path, command, flag, value):
    args = ["build", "--model", "tiny", "--random-weights", "-o", str(tmp_path / "b")]
    if command == "check":
        args = ["check", "--bundle", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, flag, value])
    assert result.exit_code == 2 and flag in one_error(result), result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "fields", [{"min_cosine": float("nan")}, {"min_cosine": 1.5}, {"min_cosine": 0.9, "max_scaled_abs_err": -1.0}]
)
def test_the_python_api_refuses_the_same_thresholds(fields):
    with pytest.raises(ConfigError):
        Thresholds(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": -0.5},
        {"top_p": float("nan")},
        {"top_p": 1.5},
        {"seed": -1},
        {"seed": 2**64},
        {"max_new_tokens": 0},
    ],
)
def test_sampling_refuses_values_outside_their_domain(fields):
    with pytest.raises(SamplingError):
        Sampling(**fields)


def test_top_p_zero_is_greedy_and_a_subnormal_temperature_is_finite():
    logits = np.random.default_rng(1).normal(size=50).astype(np.float32)
    rng = np.random.default_rng(0)
    best = int(np.argmax(logits))
    assert Sampling(temperature=1.0, top_p=0.0).choose(logits, rng) == best
    # 1e-310 is subnormal: dividing first overflowed to inf - inf = NaN; the top token wins
    assert Sampling(temperature=1e-310).choose(logits, rng) == best
    # top-p sampling still samples: over many draws more than one token appears
    draws = {Sampling(temperature=1.0, top_p=0.9).choose(logits, rng) for _ in range(200)}
    assert len(draws) > 1


def test_seeds_up_to_two_to_the_64_are_repeatable():
    logits = np.zeros(1000, np.float32)
    big = 2**64 - 1
    first = [Sampling(temperature=1.0, seed=big).choose(logits, np.random.default_rng(big)) for _ in range(3)]
    assert len(set(first)) == 1


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("what is </s> here", "</s>"),
        ("<s> hello", "<s>"),
        ("say <unk>", "<unk>"),
        ("bad \udcff byte", "not valid text"),
        ("   ", "empty"),
        ("look at <image>", "the image is given beside the prompt"),
    ],
)
def test_prompts_are_text_not_control_tokens(prompt, expected):
    with pytest.raises(InputError, match=re.escape(expected)):
        check_prompt(prompt, frozenset({"<s>", "</s>", "<unk>", "<image>"}))


def test_run_refuses_control_tokens_in_the_prompt(ccra_bundle):
    result = CliRunner().invoke(
        main, ["run", "--bundle", str(ccra_bundle), "--image", str(IMAGE), "--prompt", "what </s> is it"]
    )
    assert result.exit_code == 2 and "a control token of the tokenizer" in one_error(result)


@pytest.mark.parametrize(
    ("flag", "value"), [("--temperature", "nan"), ("--top-p", "nan"), ("--top-p", "1.5"), ("--seed", "-1")]
)
def test_run_refuses_bad_sampling_flags(ccra_bundle, flag, value):
    args = ["run", "--bundle", str(ccra_bundle), "--image", str(IMAGE), "--prompt", "hi", flag, value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and flag in one_error(result)


def test_run_with_top_p_zero_equals_greedy(ccra_bundle):
    base = ["run", "--bundle", str(ccra_bundle), "--image", str(IMAGE), "--prompt", "hi", "--max-new-tokens", "6"]
    greedy = CliRunner().invoke(main, base)
    top_p_zero = CliRunner().invoke(main, [*base, "--temperature", "1", "--top-p", "0", "--seed", "3"])
    assert greedy.exit_code == top_p_zero.exit_code == 0
    assert greedy.stdout.strip() and greedy.stdout == top_p_zero.stdout


def test_a_parity_batch_above_the_profile_is_refused_before_the_export(tmp_path):
    args = ["build", "--model", "tiny", "--random-weights", "-o", str(tmp_path / "b")]
    result = CliRunner().invoke(main, [*args, "--parity-batch", "9", "--max-batch", "8"])
    assert result.exit_code == 2 and "exceeds the profile's --max-batch 8" in one_error(result)
    assert "Exporting" not in result.output and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def plugin_like(tmp_path_factory) -> Path:
    """A real ELF shared object exporting getCreators, built with the system C++ compiler."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build a stand-in plugin library")
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "p.cpp").write_text('extern "C" void* getCreators(int& n) { n = 0; return nullptr; }\n')
    subprocess.run([compiler, "-shared", "-fPIC", "-o", folder / "libp.so", folder / "p.cpp"], check=True)
    return folder / "libp.so"


def test_plugin_library_must_be_an_elf_shared_object_with_creators(tmp_path, plugin_like):
    assert check_plugin_library(plugin_like) == plugin_like
    text = tmp_path / "notes.so"
    text.write_text("not a library")
    truncated = tmp_path / "trunc.so"
    truncated.write_bytes(plugin_like.read_bytes()[:2000])
    from ccra_export.runtime import lpwca_cpu

    cases = {
        text: "not an ELF file",
        truncated: "truncated or malformed",
        lpwca_cpu.library_path(): "exports neither getCreators",  # a shared object, but not a plugin
        tmp_path / "missing.so": "no such file",
    }
    for path, expected in cases.items():
        with pytest.raises(ConfigError, match=expected):
            check_plugin_library(path)
    result = CliRunner().invoke(
        main, ["build", "--model", "tiny", "--random-weights", "-o", str(tmp_path / "b"), "--plugin-library", str(text)]
    )
    assert result.exit_code == 2 and "not an ELF file" in one_error(result)


def test_check_reruns_the_language_model_against_its_build_figures(tmp_path, ccra_bundle):
    result = CliRunner().invoke(main, ["check", "--bundle", str(ccra_bundle), "--reference", "recorded"])
    assert result.exit_code == 0, result.output
    assert "build-time tokens reproduced" in result.stdout and "greedy tokens agreeing" in result.stdout
    parity = json.loads((ccra_bundle / "parity.json").read_text())["language_model"]
    assert parity["tokens_agreeing"] == parity["greedy_steps"] == 32  # FP32 decoder: Hugging Face's tokens
    # a decoder that answers differently from its own build is caught (the recorded tokens edited)
    copy = tmp_path / "b"
    shutil.copytree(ccra_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["language_model"]["parity"]["tokens"][5] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    changed = CliRunner().invoke(main, ["check", "--bundle", str(copy), "--reference", "recorded"])
    assert changed.exit_code == 3 and "differ from the build's own at step 5" in changed.output


def test_errors_are_ccra_export_errors():
    assert issubclass(SamplingError, CCRAExportError) and issubclass(InputError, CCRAExportError)
