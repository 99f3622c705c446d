"""Image + prompt -> text: our ONNX pipeline against Hugging Face's LlavaForConditionalGeneration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.image_preprocess import ImageProcessorConfig, preprocess
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline
from tests.bundles import build
from tests.torchless import run_cli

PROMPT = "What is in the picture?"


def hf_generate(hf_llava, prepared, image, steps):
    """HF's own path: the <image> token expanded to N image tokens, pixel values from the processor."""
    n = prepared.visual_tokens.shape[1]
    ids = prepared.input_ids
    expanded = ids[: prepared.image_position] + [127] * n + ids[prepared.image_position + 1 :]
    input_ids = torch.tensor([expanded])
    pixels = torch.from_numpy(preprocess(image, ImageProcessorConfig.for_image_size(56))[None])
    hf_llava.generation_config.eos_token_id = None
    with torch.no_grad():
        logits = hf_llava(input_ids=input_ids, pixel_values=pixels).logits[0, -1].numpy()
        out = hf_llava.generate(
            input_ids=input_ids,
            pixel_values=pixels,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, input_ids.shape[1] :].tolist(), logits


def test_fp32_pipeline_reproduces_hf_llava_greedy_tokens(fp32_bundle, hf_llava, cat):
    pipeline = Pipeline.from_bundle(fp32_bundle)
    _, generation, prepared = pipeline.generate_tokens(cat, PROMPT, Sampling(max_new_tokens=32))
    want, want_logits = hf_generate(hf_llava, prepared, cat, 32)
    assert generation.tokens == want  # 32 identical greedy tokens
    logits = compare_output("logits", generation.first_logits, want_logits, thresholds_for("fp32"))
    assert logits.passed, logits.failures


@pytest.mark.parametrize("lm_precision", ["int8", "int4"])
def test_quantized_language_models_report_agreement(tmp_path, plain_checkpoint, hf_llava, cat, lm_precision):
    bundle = build(tmp_path / "b", plain_checkpoint, lm_precision)
    report = json.loads((bundle / "parity.json").read_text())["language_model"]
    assert report["greedy_steps"] == 32 and 0 <= report["tokens_agreeing"] <= 32
    assert report["first_token_logits"]["cosine"] > 0.9  # quantized, but the same model
    pipeline = Pipeline.from_bundle(bundle)
    _, generation, prepared = pipeline.generate_tokens(cat, PROMPT, Sampling(max_new_tokens=8))
    _, want_logits = hf_generate(hf_llava, prepared, cat, 1)
    cosine = compare_output("logits", generation.first_logits, want_logits, thresholds_for("int8")).cosine
    assert cosine > 0.9
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["language_model"]["precision"] == lm_precision
    assert "lm/decoder/model.onnx" in manifest["files"]


def test_sampling_is_seeded_and_streams(fp32_bundle, cat):
    pipeline = Pipeline.from_bundle(fp32_bundle)
    pieces = []
    sampling = Sampling(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    first = pipeline.generate(cat, PROMPT, sampling, on_text=pieces.append)
    assert "".join(pieces) == first
    assert pipeline.generate(cat, PROMPT, Sampling(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)) == first


def test_run_command_streams_the_answer(fp32_bundle, tmp_path, cat):
    cat.save(tmp_path / "cat.jpg")
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--bundle",
            str(fp32_bundle),
            "--image",
            str(tmp_path / "cat.jpg"),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "prompt tokens (16 visual), 8 new" in result.stderr
    # the same answer on a target without PyTorch: torch made unimportable in a fresh interpreter
    args = [
        "run",
        "--bundle",
        fp32_bundle,
        "--image",
        tmp_path / "cat.jpg",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "8",
    ]
    torchless = run_cli(*args, text=False)
    assert torchless.returncode == 0, torchless.stderr.decode()
    # bytes, not text mode: universal newlines would turn a generated "\r" into "\n"
    assert torchless.stdout.decode() == result.stdout  # greedy: token for token


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "{tmp}/missing.jpg"], "--image {tmp}/missing.jpg: no such file"),
        (["--image", "{tmp}/broken.jpg"], "not a readable image"),
        (["--prompt", "  "], "--prompt: empty"),
        (["--prompt", ""], "--prompt: empty"),
        (["--prompt", "<image> what?"], "--prompt: contains <image>"),
        (["--max-new-tokens", "100000"], "exceed the context of"),
    ],
)
def test_run_bad_input(fp32_bundle, tmp_path, cat, args, message):
    cat.save(tmp_path / "cat.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    base = {"--bundle": str(fp32_bundle), "--image": str(tmp_path / "cat.jpg"), "--prompt": PROMPT}
    base.update(dict(zip(args[::2], [a.format(tmp=tmp_path) for a in args[1::2]], strict=True)))
    result = CliRunner().invoke(main, ["run", *[x for kv in base.items() for x in kv]])
    assert result.exit_code == 2 and message.format(tmp=tmp_path) in result.stderr


def test_run_needs_a_language_model_in_the_bundle(tmp_path, cat):
    assert (
        CliRunner().invoke(main, ["build", "--model", "tiny", "--random-weights", "-o", str(tmp_path / "b")]).exit_code
        == 0
    )
    cat.save(tmp_path / "cat.jpg")
    result = CliRunner().invoke(
        main, ["run", "--bundle", str(tmp_path / "b"), "--image", str(tmp_path / "cat.jpg"), "--prompt", PROMPT]
    )
    assert result.exit_code == 2 and "holds no language model" in result.stderr


def test_preset_has_no_language_model(tmp_path):
    result = CliRunner().invoke(
        main, ["build", "--model", "tiny", "--random-weights", "--lm-precision", "int4", "-o", str(tmp_path / "b")]
    )
    assert result.exit_code == 2 and "--lm-precision needs a checkpoint directory" in result.stderr


def test_ccra_pipeline_matches_the_pytorch_reference(ccra_bundle, ccra_checkpoint, hf_llava, cat):
    """With CCRA, the reference is our PyTorch vision model feeding Hugging Face's language model."""
    from ccra_export.model.checkpoint import load_checkpoint
    from ccra_export.model.vision_model import reference_outputs

    pipeline = Pipeline.from_bundle(ccra_bundle)
    _, generation, prepared = pipeline.generate_tokens(cat, PROMPT, Sampling(max_new_tokens=32))
    instruction = pipeline.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    lm = hf_llava.model.language_model
    table = lm.embed_tokens.weight.detach()
    feeds = {
        "pixel_values": preprocess(cat, ImageProcessorConfig.for_image_size(56))[None],
        "text_embeds": table[instruction][None].numpy(),
        "text_mask": np.ones((1, len(instruction)), np.int64),
    }
    visual = torch.from_numpy(reference_outputs(load_checkpoint(ccra_checkpoint).model, feeds)["visual_tokens"])
    ids, pos = prepared.input_ids, prepared.image_position
    embeds = torch.cat([table[ids[:pos]][None], visual, table[ids[pos + 1 :]][None]], dim=1)
    hf_llava.generation_config.eos_token_id = None
    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds).last_hidden_state
        want_logits = hf_llava.lm_head(hidden)[0, -1].numpy()
        tokens = [int(want_logits.argmax())]
        past = None
        out = lm(inputs_embeds=embeds, use_cache=True)
        past = out.past_key_values
        for _ in range(31):
            step = lm(inputs_embeds=table[[tokens[-1]]][None], past_key_values=past, use_cache=True)
            past = step.past_key_values
            tokens.append(int(hf_llava.lm_head(step.last_hidden_state)[0, -1].argmax()))
    assert generation.tokens == tokens
    assert compare_output("logits", generation.first_logits, want_logits, thresholds_for("fp32")).passed


@pytest.mark.slow  # test_bench_cli times both sides (and every ratio's spread) in the default run
def test_bench_reports_both_sides(fp32_bundle, plain_checkpoint):
    args = ["bench", "--bundle", str(fp32_bundle), "--model", str(plain_checkpoint)]
    result = CliRunner().invoke(main, [*args, "--new-tokens", "4", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "ccra-export (ONNX Runtime" in result.stdout and "Hugging Face (PyTorch eager)" in result.stdout
    vision = CliRunner().invoke(main, [*args, "--vision-only", "--repeats", "1"])
    assert vision.exit_code == 0 and "ratio (PyTorch / ours)" in vision.stdout


def test_run_verify_catches_a_changed_language_model(tmp_path, fp32_bundle, cat):
    import shutil

    shutil.copytree(fp32_bundle, tmp_path / "b")
    with open(tmp_path / "b" / "lm" / "embed.onnx", "r+b") as handle:  # same size: only the hash can tell
        handle.seek(100)
        handle.write(b"\0\1\2\3")
    cat.save(tmp_path / "cat.jpg")
    args = [
        "run",
        "--bundle",
        str(tmp_path / "b"),
        "--image",
        str(tmp_path / "cat.jpg"),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "2",
        "--verify",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "embed.onnx: sha256 differs from the manifest" in result.stderr


def test_bundle_from_another_format_version_is_refused(tmp_path, fp32_bundle, cat):
    import shutil

    shutil.copytree(fp32_bundle, tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    manifest["format_version"] = 0
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    cat.save(tmp_path / "cat.jpg")
    result = CliRunner().invoke(
        main, ["run", "--bundle", str(tmp_path / "old"), "--image", str(tmp_path / "cat.jpg"), "--prompt", PROMPT]
    )
    assert result.exit_code == 2 and "rebuild the bundle" in result.stderr


def test_runtime_uses_the_checkpoints_image_processor(tmp_path, plain_checkpoint):
    import shutil

    from transformers import CLIPImageProcessor

    from ccra_export.runtime.vlm_pipeline import processor_from_manifest

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(plain_checkpoint, checkpoint)
    CLIPImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    ).save_pretrained(checkpoint)
    result = CliRunner().invoke(
        main, ["build", "--model", str(checkpoint), "--precision", "fp32", "-o", str(tmp_path / "b")]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    processor = processor_from_manifest(manifest)
    assert processor.image_mean == (0.5, 0.5, 0.5) and processor.image_std == (0.25, 0.25, 0.25)
    assert processor == ImageProcessorConfig.from_checkpoint(checkpoint, 56)
