"""The shipped demo model and its task: generator, training script, answers against PyTorch and the truth."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core import shapes
from ccra_export.demo import CHECKPOINT, EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
#: the held-out questions: a seed neither training (0) nor its evaluation (1000) drew from
HELD_OUT_SEED = 4242


def answers(pipeline, items) -> list[str]:
    from ccra_export.runtime.language_model import Sampling

    return [
        pipeline.generate(
            shapes.render(s), q.question, Sampling(max_new_tokens=4, stop_ids=pipeline.lm.eos_ids)
        ).strip()
        for s, q in items
    ]


@pytest.fixture(scope="session")
def reference():
    from ccra_export.model.reference_vlm import ReferenceVLM

    return ReferenceVLM.from_checkpoint(CHECKPOINT)


# --------------------------------------------------------------------------- the training script


def test_training_targets_are_the_answers_after_the_prompt():
    """The logits after "ASSISTANT:" are trained on the answer, the next ones on </s>, as the runtime
    reads them; a follow-up turn the same, after the runtime's FOLLOW_UP text."""
    from ccra_export.core.chat_template import FOLLOW_UP, TEMPLATE
    from ccra_export.core.image_preprocess import ImageProcessorConfig
    from ccra_export.demo.train import Batcher, train_tokenizer

    tokenizer = train_tokenizer()
    batcher = Batcher(tokenizer, ImageProcessorConfig.for_image_size(128), 0)
    first = shapes.Question("count", "How many shapes are there?", "two", None)
    second = shapes.Question("color", "What color is the square?", "red", (0, 0, 1, 1))
    ids, targets = batcher.sequence([first, second])
    opening = tokenizer.encode(TEMPLATE.format(prompt=first.question)).ids
    follow_up = tokenizer.encode(FOLLOW_UP.format(prompt=second.question), add_special_tokens=False).ids
    two, red, eos = (tokenizer.token_to_id(t) for t in ("two", "red", "</s>"))
    assert ids == [*opening, two, eos, *follow_up, red, eos]
    want = [-100] * len(opening) + [two, eos] + [-100] * len(follow_up) + [red, eos]
    assert targets == want


def test_training_script_smoke_run_loss_falls(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from ccra_export.demo.train import main as train
    from ccra_export.model.checkpoint import load_checkpoint

    assert train(["--out", str(tmp_path / "ckpt"), "--smoke"]) == 0
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "training_log.jsonl").read_text().splitlines()]
    losses = [e["answer_loss"] for e in log if "answer_loss" in e]
    assert losses[-1] < 0.6 * losses[0], losses
    assert load_checkpoint(tmp_path / "ckpt").config.ccra is not None
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "ckpt")  # the Hugging Face layout, CCRA aside


# --------------------------------------------------------------------------- the shipped checkpoint


def test_shipped_checkpoint_is_package_data_and_small():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = config["package-data"]["ccra_export.demo"]
    files = [p for folder in (CHECKPOINT, EXAMPLES) for p in folder.iterdir()]
    for path in files:
        relative = path.relative_to(CHECKPOINT.parent).as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), f"{relative} would be left out of a wheel"
    assert sum(p.stat().st_size for p in files) < 20 << 20
    card = (CHECKPOINT / "README.md").read_text()
    assert "python -m ccra_export.demo.train" in card


def test_demo_with_random_weights_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["build", "--model", "demo", "--random-weights", "-o", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert (
        "--random-weights: --model demo is a trained CCRA checkpoint" in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )
    assert not (tmp_path / "b").exists()


def test_fp32_bundle_answers_as_pytorch_does_and_right(demo_fp32_bundle, reference):
    """Every held-out question: the bundle's answer is PyTorch's (the HF LLaVA language model fed our
    CCRA module's visual tokens), and the right one on at least 95% of them (the shipped model
    scores 99.9% on 1000 held-out questions, its model card)."""
    from ccra_export.runtime.vlm_pipeline import Pipeline

    items = shapes.held_out(40, HELD_OUT_SEED)
    ours = answers(Pipeline.from_bundle(demo_fp32_bundle), items)
    theirs = [reference.answer(shapes.render(s), q.question).text.strip() for s, q in items]
    assert ours == theirs
    accuracy = np.mean([a == q.answer for a, (_, q) in zip(ours, items, strict=True)])
    assert accuracy >= 0.95, accuracy


def test_fp16_vision_int4_language_model_keeps_the_answers(demo_bundle, reference):
    """The README's build: accuracy and answer flips against PyTorch FP32, printed, with a floor a
    broken pipeline (a misplaced image, a wrong preprocessing, a garbled decoder) cannot reach."""
    from ccra_export.runtime.vlm_pipeline import Pipeline

    items = shapes.held_out(40, HELD_OUT_SEED)
    ours = answers(Pipeline.from_bundle(demo_bundle), items)
    theirs = [reference.answer(shapes.render(s), q.question).text.strip() for s, q in items]
    accuracy = np.mean([a == q.answer for a, (_, q) in zip(ours, items, strict=True)])
    flips = np.mean([a != b for a, b in zip(ours, theirs, strict=True)])
    print(f"fp16 vision + int4 language model: accuracy {accuracy:.3f}, flips vs PyTorch {flips:.3f} ({len(items)})")
    assert accuracy >= 0.95 and flips <= 0.05, (accuracy, flips)


def test_int8_demo_calibrates_on_generated_task_pictures_and_says_so():
    """No --calib-data: the demo calibrates on its own task's pictures (a fixed seed), one line says so."""
    import io

    from rich.console import Console

    from ccra_export.core.console import Steps
    from ccra_export.workflows import quantization
    from ccra_export.workflows.source import resolve_source

    source = resolve_source("demo", random_weights=False, seed=0, plain=False)
    said = io.StringIO()
    calibration = quantization.prepare(
        quantization.Int8Options(limit=20), source, 0, Steps(Console(file=said, width=200))
    )
    assert "no --calib-data; 18 generated shapes-task pictures (seed 2), 2 held out" in said.getvalue()
    assert len(calibration.dataset.calibration) == 18 and len(calibration.dataset.held_out) == 2
    again = quantization.task_calibration_set(None, 20)
    assert [i.prompt for i in again.calibration] == [i.prompt for i in calibration.dataset.calibration]
    pixels = [np.asarray(i.image) for i in calibration.dataset.calibration]
    assert all((a == np.asarray(b.image)).all() for a, b in zip(pixels, again.calibration, strict=True))
    asked = {t.format(kind=k, color=c) for t in shapes.TEMPLATES.values() for k in shapes.KINDS for c in shapes.COLORS}
    assert all(i.prompt in asked for i in calibration.dataset.calibration)


@pytest.mark.slow  # the INT8 machinery itself is covered by test_calibration; this is the demo's end to end
def test_int8_demo_build_records_generated_calibration(tmp_path):
    result = CliRunner().invoke(
        main, ["build", "--model", "demo", "--precision", "int8", "--max-calib-images", "16", "-o", str(tmp_path / "b")]
    )
    assert result.exit_code == 0, result.output
    assert "no --calib-data" in result.output and "generated shapes-task pictures" in result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source"]["name"] == "demo"
    assert manifest["calibration"]["calibration_dir"].startswith("generated: shapes task")
