"""`--ccra-module`: a user's CCRA-like module through build, FP16, INT8, split, `run` and `check`.

The module under test (tests/ccra_plugins.py) is deliberately unlike the reconstruction. Each
reference is independent of the export: the module itself run in PyTorch, and the refusals'
one-line messages."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.config import DEFAULT_CCRA_MODULE, preset
from ccra_export.core.manifest import read_manifest
from ccra_export.core.reference_record import load_reference
from ccra_export.model import ccra_module
from ccra_export.model.ccra_plugin import CCRAModuleError, CCRAModuleSpec, load_factory
from ccra_export.model.checkpoint import save_ccra_weights
from ccra_export.model.vision_model import build_model
from ccra_export.runtime.backends import bundle_backend
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline
from tests.bundles import build
from tests.ccra_plugins import LayerGatedCrossAttention
from tests.test_generation import PROMPT

PLUGIN = "tests.ccra_plugins:LayerGatedCrossAttention"
NO_MAP = "tests.ccra_plugins:features_only"


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def preset_build(out, *extra: str):
    return cli("build", "--model", "tiny", "--random-weights", "-o", str(out), *extra)


def one_line_refusal(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and text in lines[-1], result.stderr
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def plugin_checkpoint(tmp_path_factory, plain_checkpoint):
    """The tiny checkpoint with ccra.safetensors holding the plug-in's weights (its own state_dict
    names) and naming it in its metadata."""
    path = tmp_path_factory.mktemp("ckpt") / "plugin"
    shutil.copytree(plain_checkpoint, path)
    config = preset("tiny")
    config = config.with_ccra(type(config.ccra)(**{**config.ccra.__dict__, "module": PLUGIN}))
    save_ccra_weights(build_model(config, seed=11), path)
    return path


@pytest.fixture(scope="module")
def plugin_bundle(tmp_path_factory, plugin_checkpoint):
    return build(tmp_path_factory.mktemp("plugin") / "b", plugin_checkpoint, "fp32")


class TestInterface:
    def test_the_reconstruction_is_registered_through_the_same_interface(self):
        assert load_factory(DEFAULT_CCRA_MODULE) is ccra_module.reconstruction
        model = build_model(preset("tiny"), seed=0)
        assert type(model.ccra) is ccra_module.CCRA and model.provides_attention

    def test_the_plugin_is_the_module_the_graph_computes(self, tmp_path):
        result = preset_build(tmp_path / "b", "--precision", "fp32", "--ccra-module", PLUGIN, "--single-vision-graph")
        assert result.exit_code == 0, result.output
        manifest = read_manifest(tmp_path / "b")
        assert manifest["source"]["ccra_module"] == PLUGIN and manifest["export"]["lpwca"] == "portable"
        # independent reference: the module's own forward in PyTorch, fed the tower's stacked states
        config = preset("tiny")
        config = config.with_ccra(type(config.ccra)(**{**config.ccra.__dict__, "module": PLUGIN}))
        model = build_model(config, seed=0)
        assert type(model.ccra) is LayerGatedCrossAttention
        feeds, _ = load_reference(tmp_path / "b" / "reference.npz")
        with torch.no_grad():
            pixels, text, mask = (torch.from_numpy(feeds[k]) for k in ("pixel_values", "text_embeds", "text_mask"))
            fused, attention = model.ccra(model.tower_features(pixels), text, mask)
            tokens = model.multi_modal_projector(fused)
        runner, _ = bundle_backend(tmp_path / "b", manifest, "ort")
        ours = runner.run(feeds)
        np.testing.assert_allclose(ours["visual_tokens"], tokens.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours["lpwca_attention"], attention.numpy(), rtol=1e-4, atol=1e-7)
        # and the graph holds the plug-in's weights, not the reconstruction's
        names = {t.name for t in onnx.load(str(tmp_path / "b" / "vision.onnx")).graph.initializer}
        assert any("layer_logits" in n for n in names) and not any("text_score" in n for n in names)

    def test_fused_lpwca_is_refused_for_a_module_without_the_contract(self, tmp_path):
        result = preset_build(tmp_path / "b", "--ccra-module", PLUGIN, "--lpwca", "fused")
        one_line_refusal(result, "does not declare the LPWCA contract")
        assert not (tmp_path / "b").exists()

    @pytest.mark.parametrize(
        ("module", "message"),
        [
            ("not a path", "expected package.module:Factory"),
            ("tests.no_such_module:Factory", "cannot import tests.no_such_module (ModuleNotFoundError"),
            ("tests.ccra_plugins:Missing", "tests.ccra_plugins has no attribute 'Missing'"),
            ("tests.ccra_plugins:unmarked", "expected a torch.nn.Module subclass or a function marked"),
            ("os:system", "expected a torch.nn.Module subclass or a function marked"),
            ("tests.ccra_plugins:WrongShape", "forward returned (2, 3, 16, 64); expected [2, 16, 64] features"),
            ("tests.ccra_plugins:NotTraceable", "does not export to ONNX"),
        ],
    )
    def test_a_module_that_cannot_serve_is_one_line(self, tmp_path, module, message):
        result = preset_build(tmp_path / "b", "--precision", "fp32", "--ccra-module", module)
        one_line_refusal(result, message)
        assert module.split(":")[0] in result.stderr.strip().splitlines()[-1] or module == "not a path"
        assert not (tmp_path / "b").exists()

    def test_weights_for_another_module_are_refused_by_name(self, tmp_path, ccra_checkpoint):
        # the reconstruction's weights, read as the plug-in's: the state_dict names differ
        result = cli("build", "--model", str(ccra_checkpoint), "--ccra-module", PLUGIN, "-o", str(tmp_path / "b"))
        one_line_refusal(result, f"weights do not match the state_dict of {PLUGIN}")


class TestPrecisions:
    @pytest.mark.slow  # FP16 islands by scope are the same mechanism the reconstruction's default tests use
    def test_fp16_keeps_the_module_fp32_and_passes(self, tmp_path):
        result = preset_build(tmp_path / "b", "--precision", "fp16", "--ccra-module", PLUGIN)
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / "b" / "parity.json").read_text())
        assert report["passed"] and "ccra" in report["emulated_fp16"]["fp32_modules"]
        assert all(o["cosine"] > 0.999 for o in report["outputs"])

    def test_int8_calibrates_with_the_module_unquantized_and_reports_its_drift(self, tmp_path, cat):
        photos = tmp_path / "photos"
        photos.mkdir()
        for i in range(6):
            cat.rotate(20 * i).save(photos / f"{i}.png")
        result = preset_build(
            tmp_path / "b",
            "--precision",
            "int8",
            "--ccra-module",
            PLUGIN,
            "--calib-data",
            str(photos),
            "--holdout",
            "2",
            "--single-vision-graph",  # the module's nodes and the Q/DQ in one graph
        )
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / "b" / "parity.json").read_text())
        assert report["passed"]
        labels = [row["label"] for row in report["layers"]["rows"]]
        assert labels[-2:] == ["ccra module", "visual tokens"]
        graph = onnx.load(str(tmp_path / "b" / "vision.onnx"))
        quantized_inputs = {n.output[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"}
        ccra_nodes = [
            n
            for n in graph.graph.node
            if any(p.key == "pkg.torch.onnx.name_scopes" and "'ccra'" in p.value for p in n.metadata_props)
        ]
        assert ccra_nodes and not any(set(n.input) & quantized_inputs for n in ccra_nodes if n.op_type == "MatMul")

    @pytest.mark.slow  # split is module-agnostic: the default run splits the reconstruction everywhere
    def test_split_vision_puts_the_module_in_the_head(self, tmp_path):
        result = preset_build(tmp_path / "b", "--precision", "fp32", "--ccra-module", PLUGIN)  # split: the CCRA default
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / "b" / "parity.json").read_text())
        assert report["passed"] and set(report["graphs"]) == {"vision_tower", "ccra_head"}

    def test_a_module_without_an_attention_map(self, tmp_path):
        result = preset_build(tmp_path / "b", "--precision", "fp32", "--ccra-module", NO_MAP)
        assert result.exit_code == 0, result.output
        manifest = read_manifest(tmp_path / "b")
        assert [o["name"] for o in manifest["graph"]["outputs"]] == ["visual_tokens"]
        assert manifest["variant"] == "ccra"  # it still reads the instruction
        assert [i["name"] for i in manifest["graph"]["inputs"]] == ["pixel_values", "text_embeds", "text_mask"]


class TestCheckpointAndRuntime:
    def test_checkpoint_names_its_module_and_run_answers(self, plugin_bundle, plugin_checkpoint, tmp_path, cat):
        manifest = read_manifest(plugin_bundle)
        assert (
            manifest["source"]["ccra_module"] == PLUGIN
            and json.loads((plugin_bundle / "parity.json").read_text())["passed"]
        )
        cat.save(tmp_path / "cat.png")
        result = cli(
            "run", "--bundle", str(plugin_bundle), "--image", str(tmp_path / "cat.png"), "--prompt", PROMPT,
            "--max-new-tokens", "6",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        pipeline = Pipeline.from_bundle(plugin_bundle)
        expected = pipeline.generate(
            tmp_path / "cat.png", PROMPT, Sampling(max_new_tokens=6, stop_ids=pipeline.lm.eos_ids)
        )
        assert result.stdout == f"{expected}\n"
        attention = pipeline.attention(cat, PROMPT)  # the plug-in's map, drawn like the reconstruction's
        assert attention.weights.shape == (3, 4, 4) and attention.weights.sum() == pytest.approx(1.0, abs=1e-5)

    def test_check_recomputes_only_when_the_user_names_the_module(self, plugin_bundle, plugin_checkpoint):
        recorded = cli("check", "--bundle", str(plugin_bundle))
        assert recorded.exit_code == 0, recorded.output
        assert f"--ccra-module {PLUGIN} recomputes it with PyTorch" in recorded.stderr or "recorded" in recorded.stderr
        unnamed = cli(
            "check", "--bundle", str(plugin_bundle), "--model", str(plugin_checkpoint), "--reference", "pytorch"
        )
        one_line_refusal(unnamed, f"pass --ccra-module {PLUGIN}")
        named = cli(
            "check", "--bundle", str(plugin_bundle), "--model", str(plugin_checkpoint), "--ccra-module", PLUGIN,
            "--reference", "pytorch",
        )  # fmt: skip
        assert named.exit_code == 0, named.output
        assert "reference: PyTorch" in named.stderr

    def test_a_manifest_naming_code_is_never_imported(self, plugin_bundle, tmp_path):
        copy = tmp_path / "copy"
        shutil.copytree(plugin_bundle, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["source"]["ccra_module"] = "ccra_export_evil.payload:Factory"
        (copy / "manifest.json").write_text(json.dumps(manifest))
        result = cli("check", "--bundle", str(copy), "--reference", "pytorch", "--model", "/nonexistent")
        assert result.exit_code == 2 and "ccra_export_evil" in result.stderr and "cannot import" not in result.stderr
        manifest["source"]["ccra_module"] = "os.system"  # not package.module:Factory
        (copy / "manifest.json").write_text(json.dumps(manifest))
        bad = cli("check", "--bundle", str(copy))
        assert bad.exit_code == 2 and "source" in bad.stderr and "ccra_module" in bad.stderr


def test_spec_exposes_the_interface_fields():
    config = preset("tiny").ccra
    spec = CCRAModuleSpec(config, 64, 16)
    assert (spec.feature_layers, spec.num_layers, spec.text_hidden_size, spec.options) == ((1, 2, 3), 3, 96, {})
    with pytest.raises(CCRAModuleError, match=r"expected package\.module:Factory"):
        load_factory("tests.ccra_plugins")


def test_review_fixes(tmp_path, monkeypatch, plugin_checkpoint):
    from ccra_export.model.ccra_plugin import declares_lpwca_contract

    # the working directory is not searched: a checkpoint cannot ship the code its metadata names
    (tmp_path / "shipped_payload.py").write_text("import torch\nclass Factory(torch.nn.Module):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CCRAModuleError, match="cannot import shipped_payload"):
        load_factory("shipped_payload:Factory")

    # declaring the contract is not enough without the reconstruction's sizes for the kernel
    class Claims(LayerGatedCrossAttention):
        lpwca_contract = True
        lpwca_impl = "portable"

    assert not declares_lpwca_contract(Claims(CCRAModuleSpec(preset("tiny").ccra, 64, 16)))

    # naming the reconstruction explicitly wins over the checkpoint's own entry (whose weights are the plug-in's)
    result = cli(
        "build", "--model", str(plugin_checkpoint), "--ccra-module", DEFAULT_CCRA_MODULE, "-o", str(tmp_path / "b")
    )
    one_line_refusal(result, "weights do not match")


def test_parameter_count_is_the_modules(plugin_bundle):
    config = preset("tiny")
    config = config.with_ccra(type(config.ccra)(**{**config.ccra.__dict__, "module": PLUGIN}))
    module = build_model(config, seed=0).ccra
    assert read_manifest(plugin_bundle)["ccra_parameters"] == sum(p.numel() for p in module.parameters())
