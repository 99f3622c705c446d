"""Build on a workstation, engine on the target: the recorded PyTorch reference, `check --reference`,
`ccra-export engine`'s refusals (TensorRT itself is absent here), profiles and the ORT TensorRT EP."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.config import preset
from ccra_export.core.errors import BackendUnavailableError, BundleError
from ccra_export.core.hashing import sha256_file
from ccra_export.core.manifest import file_entry
from ccra_export.core.reference_record import MAX_RECORDED_SAMPLES, load_reference, record_reference
from ccra_export.core.sample_inputs import random_inputs
from ccra_export.engine import ort_trt
from ccra_export.model.vision_model import build_model, reference_outputs
from ccra_export.runtime.backends import tensorrt_status
from tests.conftest import TINY_FP32
from tests.torchless import run_cli


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def snapshot(bundle):
    return {p.name: sha256_file(p) for p in sorted(bundle.iterdir())}


def built(tmp_path_factory, name: str, *flags: str):
    out = tmp_path_factory.mktemp("engine") / name
    result = run("build", "--model", "tiny", "--random-weights", *flags, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles(*TINY_FP32)


@pytest.fixture(scope="module")
def fused_bundle(tmp_path_factory):
    return built(tmp_path_factory, "tiny-fused", "--precision", "fp16", "--lpwca", "fused")


class TestRecordedReference:
    def test_bundle_records_pytorch_outputs_on_the_parity_inputs(self, bundle):
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["files"]["reference.npz"] == file_entry(bundle / "reference.npz")
        assert manifest["reference"]["samples"] == 2 and manifest["reference"]["inputs"]["seed"] == 3
        feeds, outputs = load_reference(bundle / "reference.npz")
        config = preset("tiny")
        expected_feeds = random_inputs(config, batch=2, text_len=16, seed=3)
        for name, value in expected_feeds.items():
            np.testing.assert_array_equal(feeds[name], value)
        # recomputed here, independently of the build: the same seeded model on the same inputs
        expected = reference_outputs(build_model(config, seed=3), expected_feeds)
        np.testing.assert_allclose(outputs["visual_tokens"], expected["visual_tokens"], rtol=0, atol=1e-6)

    def test_check_against_recorded_outputs_needs_no_torch(self, bundle):
        # torch made unimportable in a fresh interpreter: --reference auto must fall back to the record
        result = run_cli("check", "--bundle", bundle)
        assert result.returncode == 0, result.stderr
        assert "auto: PyTorch is not installed here" in result.stderr and "parity passed" in result.stdout

    def test_build_without_the_export_stack_is_one_line(self, tmp_path):
        result = run_cli("build", "--model", "tiny", "--random-weights", "-o", tmp_path / "b")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "ccra-export build needs PyTorch" in result.stderr
        assert 'pip install -e ".[export]" in the ccra-export checkout' in result.stderr  # brackets survive rich
        assert list(tmp_path.iterdir()) == []

    def test_recorded_check_fails_when_the_graph_disagrees(self, bundle, tmp_path):
        copy = tmp_path / "b"
        shutil.copytree(bundle, copy)
        feeds, outputs = load_reference(copy / "reference.npz")
        outputs["visual_tokens"][0, 0] += 1.0  # one token of one image off: the comparison must notice
        record_reference(copy / "reference.npz", feeds, outputs)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["files"]["reference.npz"] = file_entry(copy / "reference.npz")
        (copy / "manifest.json").write_text(json.dumps(manifest))
        result = run("check", "--bundle", copy, "--reference", "recorded")
        assert result.exit_code == 3 and "parity FAILED" in result.stderr

    def test_a_changed_reference_file_is_refused(self, bundle, tmp_path):
        copy = tmp_path / "b"
        shutil.copytree(bundle, copy)
        with open(copy / "reference.npz", "r+b") as handle:
            handle.seek(100)
            handle.write(b"\0\0\0\0")
        assert "reference.npz: sha256 differs" in one_line_error(run("check", "--bundle", copy))

    def test_record_keeps_at_most_the_first_samples(self, tmp_path):
        rows = MAX_RECORDED_SAMPLES + 3
        feeds = {"pixel_values": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)}
        kept = record_reference(tmp_path / "r.npz", feeds, {"visual_tokens": feeds["pixel_values"] * 2})
        loaded_feeds, loaded = load_reference(tmp_path / "r.npz")
        assert kept == MAX_RECORDED_SAMPLES and len(loaded["visual_tokens"]) == MAX_RECORDED_SAMPLES
        np.testing.assert_array_equal(loaded["visual_tokens"], loaded_feeds["pixel_values"] * 2)

    def test_unreadable_reference_is_one_line(self, tmp_path):
        (tmp_path / "r.npz").write_bytes(b"not a zip")
        with pytest.raises(BundleError, match=r"r\.npz: unreadable recorded reference"):
            load_reference(tmp_path / "r.npz")


class TestEngineCommand:
    @pytest.mark.skipif(tensorrt_status()[0], reason="TensorRT is usable here: the refusal cannot be shown")
    def test_without_tensorrt_one_line_and_bundle_untouched(self, bundle):
        before = snapshot(bundle)
        result = run("engine", "--bundle", bundle, "--timing-cache", bundle.parent / "t.cache")
        assert result.exit_code == 2
        assert "ccra-export engine: TensorRT is not installed" in one_line_error(result)
        assert snapshot(bundle) == before  # no engine, no scratch directory, manifest as it was

    def test_fused_graph_needs_the_plugin_library(self, fused_bundle):
        message = one_line_error(run("engine", "--bundle", fused_bundle))
        assert "--plugin-library: this bundle's graph has the fused ccra::LPWCA node" in message

    def test_profile_flags_are_checked_against_the_manifest(self, bundle):
        message = one_line_error(run("engine", "--bundle", bundle, "--opt-batch", "9"))  # manifest max is 8
        assert "profile for 'batch': need 1 <= min <= opt <= max" in message

    def test_not_a_bundle(self, tmp_path):
        assert "no manifest.json" in one_line_error(run("engine", "--bundle", tmp_path))


def test_build_refuses_opt_above_max_before_any_work(tmp_path):
    result = run("build", "--model", "tiny", "--random-weights", "--opt-batch", "4", "--max-batch", "2", "-o", tmp_path)
    assert "--opt-batch/--max-batch: need 1 <= min <= opt <= max" in one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_build_records_the_profile_flags(tmp_path):
    out = tmp_path / "b"
    result = run("build", "--model", "tiny", "--random-weights", "--opt-batch", "2", "--max-text-len", "32", "-o", out)
    assert result.exit_code == 0, result.output
    axes = json.loads((out / "manifest.json").read_text())["dynamic_axes"]
    assert axes == {"batch": {"min": 1, "opt": 2, "max": 8}, "text_len": {"min": 1, "opt": 32, "max": 32}}


def test_ort_tensorrt_provider_options_from_a_bundle(bundle, fused_bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    tower, head = manifest["graph"]["parts"]  # CCRA bundles are split by default: one profile per graph
    options = ort_trt.bundle_session_options(bundle, manifest, part=tower)
    name, provider = options["providers"][0]
    assert name == "TensorrtExecutionProvider" and provider["trt_fp16_enable"] is False
    assert provider["trt_profile_opt_shapes"] == "pixel_values:1x3x56x56"
    provider = ort_trt.bundle_session_options(bundle, manifest, part=head)["providers"][0][1]
    assert provider["trt_profile_opt_shapes"] == "tower_features:1x3x16x64,text_embeds:1x64x96,text_mask:1x64"
    fused = json.loads((fused_bundle / "manifest.json").read_text())
    for plugin_library in (None, fused_bundle / "libccra_lpwca_plugin.so"):  # a library does not make it runnable
        with pytest.raises(BackendUnavailableError, match="fused ccra::LPWCA node, which ONNX Runtime's TensorRT"):
            ort_trt.bundle_session_options(fused_bundle, fused, plugin_library)


class TestVisionBench:
    def test_bundle_and_pytorch_on_the_recorded_inputs(self, bundle):
        result = run("bench", "--bundle", bundle, "--batch", "3", "--repeats", "1")
        assert result.exit_code == 0, result.output
        rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("│")}
        ours = next(line for name, line in rows.items() if name.startswith("ccra-export (ONNX Runtime"))
        assert float(ours.split("│")[5]) > 0.99999  # the timed graph computes what PyTorch computes
        assert any(name.startswith("PyTorch eager") for name in rows) and "ratio (PyTorch / ours)" in rows

    def test_without_torch_times_ours_and_says_why_not_pytorch(self, bundle):
        result = run_cli("bench", "--bundle", bundle, "--repeats", "1")
        assert result.returncode == 0, result.stderr
        assert "ccra-export (ONNX Runtime" in result.stdout and "PyTorch eager" not in result.stdout
        assert "PyTorch side skipped: PyTorch is not installed here" in result.stderr


@pytest.mark.parametrize("block_torch", [False, True])
def test_doctor_reports_the_export_stack(block_torch):
    result = run_cli("doctor", "--json", block_torch=block_torch)
    assert result.returncode == 0, result.stderr
    row = next(c for c in json.loads(result.stdout) if c["component"] == "PyTorch export stack")
    assert row["ok"] is (not block_torch)
    assert ('pip install -e ".[export]"' in row["fix"]) is block_torch
