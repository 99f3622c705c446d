"""`ccra-export eval`: the bundle's answers against PyTorch FP32's and the truth, and the defects it
must catch (an image spliced one position off, a bilinear resize where CLIP uses bicubic)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core import shapes
from ccra_export.runtime import vlm_pipeline
from ccra_export.workflows.evaluate import evaluate, normalise

#: the demo's held-out questions (a seed neither training nor its evaluation drew from)
HELD_OUT_SEED = 4242


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return shapes.write_dataset(tmp_path_factory.mktemp("eval"), images=6, seed=HELD_OUT_SEED)


def test_eval_reports_flips_accuracy_and_bounds_for_the_readme_bundle(demo_bundle, held_out, tmp_path):
    result = CliRunner().invoke(
        main, ["eval", "--bundle", str(demo_bundle), "--data", str(held_out), "--json", str(tmp_path / "e.json")]
    )
    assert result.exit_code == 0, result.output
    assert "eval passed" in result.output and "answers flipped vs PyTorch" in result.output
    report = json.loads((tmp_path / "e.json").read_text(), parse_constant=_no_constants)  # strict JSON
    truth = [json.loads(line)["answer"] for line in held_out.read_text().splitlines()]
    items = report["per_item"]
    assert [i["expected"] for i in items] == truth and len(items) == 12
    ours = sum(normalise(i["ours"]) == t for i, t in zip(items, truth, strict=True)) / len(items)
    ref = sum(normalise(i["reference"]) == t for i, t in zip(items, truth, strict=True)) / len(items)
    flips = sum(normalise(i["ours"]) != normalise(i["reference"]) for i in items) / len(items)
    assert report["accuracy"] == {"bundle": ours, "reference": ref} and report["flip_rate"] == flips
    assert ref >= 0.9 and ours >= 0.9  # the demo knows its task, and the FP16 + INT4 bundle kept it
    assert report["next_token"]["positions"] == sum(len(i["reference"]) > 0 for i in items) * 2  # word + </s>
    assert report["passed"] and report["worst_token_cosine"] > 0.99


@pytest.mark.parametrize("defect", ["splice one position off", "bilinear resize"])
def test_eval_catches_runtime_defects(demo_fp32_bundle, held_out, monkeypatch, defect):
    """Both leave the demo's answers unchanged (it is robust), so flips alone would pass them: the
    prompt the decoder reads, compared position by position with PyTorch's, does not."""
    if defect == "splice one position off":
        prepare = vlm_pipeline.Pipeline.prepare

        def shifted(self, image, prompt, *args, **kwargs):
            prepared = prepare(self, image, prompt, *args, **kwargs)
            embeds, start = prepared.inputs_embeds.copy(), prepared.image_position
            end = start + prepared.visual_tokens.shape[1]
            embeds[:, start + 1 : end + 1], embeds[:, start] = prepared.inputs_embeds[:, start:end], embeds[:, end]
            return dataclasses.replace(prepared, inputs_embeds=embeds)

        monkeypatch.setattr(vlm_pipeline.Pipeline, "prepare", shifted)
    else:
        init = vlm_pipeline.Pipeline.__init__

        def bilinear(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.processor = dataclasses.replace(self.processor, resample=2)  # PIL's BILINEAR; CLIP's is BICUBIC

        monkeypatch.setattr(vlm_pipeline.Pipeline, "__init__", bilinear)
    report = evaluate(demo_fp32_bundle, held_out, limit=4)
    assert not report.passed and any(f.startswith("prompt: worst position cosine") for f in report.failures)


def test_the_fp32_bundle_without_a_defect_passes_the_fp32_bounds(demo_fp32_bundle, held_out):
    report = evaluate(demo_fp32_bundle, held_out, limit=4)
    assert report.passed, report.failures
    assert report.flip_rate == 0 and report.worst_token_cosine >= 0.99999 and report.next_token.kl_mean < 1e-6


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("not json\n", "not JSON"),
        ('{"image": "a.png"}\n', 'expected "image" and "question" strings'),
        ("[1, 2]\n", "expected a JSON object per line"),
        ('{"image": "a.png", "question": "q", "answer": 3}\n', '"answer": expected a string'),
        ("\n\n", "no items"),
    ],
)
def test_bad_data_is_one_line_naming_the_file_and_line(demo_bundle, tmp_path, lines, expected):
    data = tmp_path / "q.jsonl"
    data.write_text(lines)
    result = CliRunner().invoke(main, ["eval", "--bundle", str(demo_bundle), "--data", str(data)])
    assert result.exit_code == 2 and expected in result.stderr and "--data" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_bundle_without_a_language_model_is_refused(bundles, held_out):
    from tests.conftest import TINY_FP32

    result = CliRunner().invoke(main, ["eval", "--bundle", str(bundles(*TINY_FP32)), "--data", str(held_out)])
    assert result.exit_code == 2 and "holds no language model" in result.stderr


def test_without_pytorch_the_bundles_own_set_is_compared_with_the_answers_recorded_at_build(demo_bundle, tmp_path):
    """What a Jetson runs: no torch importable; the figures are the ones PyTorch gives here, now."""
    from tests.torchless import run_cli

    manifest = json.loads((demo_bundle / "manifest.json").read_text())
    evaluation = manifest["language_model"]["evaluation"]
    assert evaluation["items"] == 16 and evaluation["reference"] in manifest["files"]
    result = run_cli("eval", "--bundle", demo_bundle, "--json", tmp_path / "recorded.json", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "recorded at build" in result.stdout and "Traceback" not in result.stderr
    recorded = json.loads((tmp_path / "recorded.json").read_text())
    live = evaluate(demo_bundle, reference="pytorch").to_dict()
    assert [i["reference"] for i in recorded["per_item"]] == [i["reference"] for i in live["per_item"]]
    assert recorded["flip_rate"] == live["flip_rate"] and recorded["accuracy"] == live["accuracy"]
    for key in ("kl_mean", "kl_p99", "delta_p_mean"):
        assert recorded["next_token"][key] == pytest.approx(live["next_token"][key], rel=1e-4, abs=1e-9)
    assert recorded["worst_token_cosine"] == pytest.approx(live["worst_token_cosine"], abs=1e-6)


def test_recorded_answers_are_refused_for_a_question_set_of_ones_own(demo_bundle, held_out):
    args = ["eval", "--bundle", str(demo_bundle), "--data", str(held_out), "--reference", "recorded"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--reference recorded: the recorded answers are for the bundle's own" in (
        result.stderr
    )


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} in --json output: not JSON")


def test_a_tampered_recorded_reference_is_one_line(demo_bundle, tmp_path):
    import shutil

    copy = shutil.copytree(demo_bundle, tmp_path / "b")
    npz = copy / "eval" / "reference.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[:-64] + bytes(64))  # same size, other bytes
    result = CliRunner().invoke(main, ["eval", "--bundle", str(copy), "--reference", "recorded"])
    assert result.exit_code == 2 and "sha256 differs" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
