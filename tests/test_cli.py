"""`ccra-export build` / `check` end to end on CPU, as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.hashing import sha256_file
from ccra_export.core.manifest import file_entry


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny-fp16"
    result = run("build", "--model", "tiny", "--random-weights", "--precision", "fp16", "--output", out)
    assert result.exit_code == 0, result.output
    return out, result


class TestBuild:
    def test_fp16_bundle_contents(self, fp16_bundle):
        out, result = fp16_bundle
        assert sorted(p.name for p in out.iterdir()) == [  # CCRA: split vision graphs by default
            "ccra_head.onnx",
            "manifest.json",
            "parity.json",
            "reference.npz",
            "vision_tower.onnx",
        ]
        manifest = json.loads((out / "manifest.json").read_text())
        parity = json.loads((out / "parity.json").read_text())
        assert manifest["precision"] == "fp16" and manifest["variant"] == "ccra"
        assert manifest["files"]["vision_tower.onnx"] == file_entry(out / "vision_tower.onnx")
        assert manifest["export"]["opset"]["ai.onnx"] >= 17
        assert {i["name"]: i["dtype"] for i in manifest["graph"]["inputs"]}["pixel_values"] == "float16"
        assert manifest["parity"]["passed"] is parity["passed"] is True
        for output in parity["outputs"]:
            assert 0.999 <= output["cosine"] < 1.0 and output["nonfinite"] == 0
        assert "visual_tokens" in result.stdout and "parity passed" in result.stdout

    def test_fp32_bundle_meets_fp32_thresholds(self, tmp_path):
        result = run("build", "--model", "tiny", "--random-weights", "--precision", "fp32", "-o", tmp_path / "b")
        assert result.exit_code == 0, result.output
        parity = json.loads((tmp_path / "b" / "parity.json").read_text())
        for output in parity["outputs"]:
            assert output["thresholds"] == {
                "min_cosine": 0.99999,
                "max_scaled_abs_err": 1e-4,
                "allow_nonfinite": False,
                "min_token_cosine": 0.99999,
                "max_token_rel_err": 1e-3,
            }
            assert output["scaled_max_abs_err"] <= 1e-4 and output["cosine"] >= 0.99999
            if output["name"] == "visual_tokens":  # each token on its own, too
                assert output["worst_token_cosine"] >= 0.99999 and output["worst_token_rel_err"] <= 1e-3

    def test_from_ccra_checkpoint(self, tmp_path, ccra_checkpoint):
        from ccra_export.model.checkpoint import load_checkpoint

        result = run("build", "--model", ccra_checkpoint, "--precision", "fp32", "-o", tmp_path / "b")
        assert result.exit_code == 0, result.output
        manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
        assert manifest["source"]["kind"] == "checkpoint"
        assert manifest["source"]["weights_sha256"] == load_checkpoint(ccra_checkpoint).weights_sha256
        parity = json.loads((tmp_path / "b" / "parity.json").read_text())
        assert parity["inputs"]["text_embeds"] == "token embedding table rows"

    def test_plain_checkpoint_builds_plain_graph_equal_to_hf(self, tmp_path, plain_checkpoint, hf_llava):
        from tests.test_checkpoint import hf_image_features

        result = run("build", "--model", plain_checkpoint, "--precision", "fp32", "-o", tmp_path / "b")
        assert result.exit_code == 0, result.output
        assert "no ccra.safetensors; building the plain LLaVA-1.5 variant" in result.stderr
        session = ort.InferenceSession(str(tmp_path / "b" / "vision.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["pixel_values"]
        pixels = np.random.default_rng(3).standard_normal((2, 3, 56, 56), np.float32)
        got = session.run(None, {"pixel_values": pixels})[0]
        want = hf_image_features(hf_llava, torch.from_numpy(pixels))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    def test_parity_failure_exits_3_and_keeps_the_report(self, tmp_path):
        result = run("build", "--model", "tiny", "--random-weights", "--min-cosine", "1.0", "-o", tmp_path / "b")
        assert result.exit_code == 3
        assert "parity FAILED" in result.stderr and "cosine" in result.stderr
        assert json.loads((tmp_path / "b" / "parity.json").read_text())["passed"] is False


class TestBadInput:
    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--model", "tiny-7b", "--random-weights"], "unknown preset 'tiny-7b'"),
            (["--model", "tiny"], "a preset has no trained weights"),
            (["--model", "./no/such/ckpt"], "no such checkpoint directory"),
            (["--model", "tiny", "--random-weights", "--backend", "trt"], "--backend trt: TensorRT is not installed"),
        ],
    )
    def test_one_line_error_and_nothing_written(self, tmp_path, args, message):
        result = run("build", *args, "-o", tmp_path / "out")
        assert result.exit_code == 2
        assert message in one_line_error(result)
        assert not (tmp_path / "out").exists()
        assert leftovers(tmp_path) == []

    def test_corrupt_checkpoint(self, tmp_path, checkpoint_copy):
        (checkpoint_copy / "model.safetensors").write_bytes(b"\x00" * 16)
        result = run("build", "--model", checkpoint_copy, "-o", tmp_path / "out")
        assert result.exit_code == 2
        assert "model.safetensors: not a readable safetensors file" in one_line_error(result)
        assert not (tmp_path / "out").exists()

    def test_existing_bundle_needs_force(self, tmp_path, fp16_bundle):
        out = tmp_path / "b"
        shutil.copytree(fp16_bundle[0], out)
        before = sha256_file(out / "manifest.json")
        result = run("build", "--model", "tiny", "--random-weights", "--precision", "fp32", "-o", out)
        assert result.exit_code == 2 and "already holds a bundle; pass --force" in one_line_error(result)
        assert sha256_file(out / "manifest.json") == before
        result = run("build", "--model", "tiny", "--random-weights", "--precision", "fp32", "-o", out, "--force")
        assert result.exit_code == 0, result.output
        assert json.loads((out / "manifest.json").read_text())["precision"] == "fp32"
        assert leftovers(tmp_path) == []

    def test_non_empty_directory_is_never_overwritten(self, tmp_path):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        result = run("build", "--model", "tiny", "--random-weights", "-o", tmp_path / "mine", "--force")
        assert result.exit_code == 2 and "is not empty and holds no bundle" in one_line_error(result)
        assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

    def test_unwritable_output(self, tmp_path):
        (tmp_path / "file").write_text("x")
        result = run("build", "--model", "tiny", "--random-weights", "-o", tmp_path / "file" / "bundle")
        assert result.exit_code == 2 and "--output" in one_line_error(result)

    def test_bad_flag_value_is_reported_by_click(self, tmp_path):
        result = run("build", "--model", "tiny", "--random-weights", "--precision", "int3", "-o", tmp_path / "b")
        assert result.exit_code == 2 and "'int3' is not one of" in result.stderr


class TestCheck:
    def test_fresh_inputs_pass(self, fp16_bundle):
        result = run("check", "--bundle", fp16_bundle[0], "--parity-batch", "3", "--parity-text-len", "21")
        assert result.exit_code == 0, result.output
        assert "3x16x96" in result.stdout and "parity passed" in result.stdout
        assert "seed" in result.stderr

    def test_tampered_graph_is_refused(self, tmp_path, fp16_bundle):
        out = tmp_path / "b"
        shutil.copytree(fp16_bundle[0], out)
        with open(out / "ccra_head.onnx", "r+b") as handle:  # same size: only the hash can tell
            handle.seek(200)
            handle.write(bytes(255 - b for b in handle.read(4)))
        result = run("check", "--bundle", out)
        assert result.exit_code == 2 and "sha256 differs from the manifest" in one_line_error(result)
        with open(out / "ccra_head.onnx", "ab") as handle:  # a size change is caught without hashing
            handle.write(b"\x00")
        result = run("check", "--bundle", out)
        assert result.exit_code == 2 and "bytes, the manifest records" in one_line_error(result)

    def test_not_a_bundle(self, tmp_path):
        result = run("check", "--bundle", tmp_path)
        assert result.exit_code == 2 and "no manifest.json" in one_line_error(result)

    def test_moved_checkpoint(self, tmp_path, checkpoint_copy):
        assert run("build", "--model", checkpoint_copy, "-o", tmp_path / "b").exit_code == 0
        moved = tmp_path / "moved"
        checkpoint_copy.rename(moved)
        # the manifest's checkpoint path is provenance: the user names the checkpoint to recompute with
        result = run("check", "--bundle", tmp_path / "b", "--reference", "pytorch")
        assert result.exit_code == 2 and "pass --model DIR, the checkpoint this bundle" in one_line_error(result)
        fallback = run("check", "--bundle", tmp_path / "b")  # auto: the recorded outputs, and says so
        assert fallback.exit_code == 0 and "auto: --model CHECKPOINT recomputes it" in fallback.stderr
        recomputed = run("check", "--bundle", tmp_path / "b", "--model", moved)
        assert recomputed.exit_code == 0 and "reference: PyTorch, recomputed" in recomputed.stderr

    def test_changed_checkpoint_is_refused(self, tmp_path, checkpoint_copy):
        from ccra_export.core.config import preset
        from ccra_export.model.checkpoint import save_ccra_weights
        from ccra_export.model.vision_model import build_model

        assert run("build", "--model", checkpoint_copy, "-o", tmp_path / "b").exit_code == 0
        save_ccra_weights(build_model(preset("tiny"), seed=99), checkpoint_copy)
        result = run("check", "--bundle", tmp_path / "b", "--model", checkpoint_copy)
        assert result.exit_code == 2 and "sha256 mismatch" in one_line_error(result)


@pytest.mark.parametrize("command", [[], ["build"], ["check"], ["engine"]])
def test_help_explains(command):
    result = subprocess.run(
        [sys.executable, "-m", "ccra_export.cli", *command, "--help"], capture_output=True, text=True, check=True
    )
    assert "Usage:" in result.stdout and "parity" in result.stdout.lower()


class TestFusedLpwca:
    def test_build_and_check_fused(self, tmp_path):
        out = tmp_path / "b"
        result = run(
            "build", "--model", "tiny", "--random-weights", "--precision", "fp32", "--lpwca", "fused", "-o", out
        )
        assert result.exit_code == 0, result.output
        assert "LPWCA: fused (--lpwca fused)" in result.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["export"]["lpwca"] == "fused"
        plugin = manifest["plugin"]
        assert (plugin["node"], plugin["plugin_version"], plugin["plugin_namespace"]) == ("ccra::LPWCA", "1", "ccra")
        assert len(plugin["cpu_kernel_library"]["sha256"]) == 64
        assert run("check", "--bundle", out, "--parity-batch", "3").exit_code == 0

    def test_auto_is_portable_on_onnxruntime_and_says_why(self, fp16_bundle):
        out, result = fp16_bundle
        assert "LPWCA: portable (auto: ONNX Runtime" in result.stderr
        assert json.loads((out / "manifest.json").read_text())["plugin"] is None

    def test_plain_variant_has_nothing_to_fuse(self, tmp_path):
        result = run(
            "build", "--model", "tiny", "--random-weights", "--plain", "--lpwca", "fused", "-o", tmp_path / "b"
        )
        assert result.exit_code == 2 and "has no LPWCA stage" in one_line_error(result)

    def test_missing_plugin_library(self, tmp_path):
        result = run(
            "build",
            "--model",
            "tiny",
            "--random-weights",
            "--lpwca",
            "fused",
            "--plugin-library",
            tmp_path / "nope.so",
            "-o",
            tmp_path / "b",
        )  # refused as the option is parsed (click's usage error), before anything runs
        assert result.exit_code == 2 and "Invalid value for '--plugin-library': no such file" in result.output
        assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("verb", ["run", "explain", "serve", "bench"])
def test_backend_help_describes_only_the_backends_the_verb_takes(verb):
    command = main.commands[verb]
    option = next(p for p in command.params if p.name == "backend")
    offered = set(option.type.choices)
    described = {name for name in ("auto", "ort", "trt", "ort-trt") if f"{name}:" in option.help}
    assert described == offered, (verb, described, offered)
