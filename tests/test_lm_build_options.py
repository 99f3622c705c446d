"""`build --context`, the pruned LM head and `--kv-cache int8` (issue 28): what the decoder serves,
what it computes, and what its INT8 KV cache costs, against Hugging Face and the unquantized cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ccra_export.calibration.kv_scales import HEADROOM, QMAX, KVRanges, pair_envelope
from ccra_export.cli import main
from ccra_export.core.errors import BundleError, ConfigError
from ccra_export.core.lm_quality import DEFAULT_BOUNDS, KV_INT8_BOUNDS, bounds_for, next_token_figures, violations
from ccra_export.core.manifest_schema import DecoderRecord, validate_record
from ccra_export.export.lm_export import DecoderOptions, language_model_dir
from ccra_export.runtime import lm_parity
from ccra_export.runtime.language_model import LanguageModel, Sampling
from ccra_export.workflows import language_model as workflow

# ---------------------------------------------------------------- refusals, before anything loads


def _build(*args: str):
    return CliRunner().invoke(main, ["build", "--precision", "fp32", *args])


def test_a_context_above_the_models_is_refused_naming_the_flag_and_nothing_is_written(plain_checkpoint, tmp_path):
    out = tmp_path / "b"
    result = _build("--model", str(plain_checkpoint), "--lm-precision", "fp32", "--context", "2049", "-o", str(out))
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line == (
        "error: --context 2049: above the model's own context of 2048 tokens (its max_position_embeddings); "
        "expected 1..2048"
    )
    assert "Traceback" not in result.output
    assert not out.exists()


def test_the_demos_context_is_its_own(tmp_path):
    result = _build("--model", "demo", "--lm-precision", "int4", "--context", "513", "-o", str(tmp_path / "b"))
    assert result.exit_code == 2 and "above the model's own context of 512 tokens" in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--context", "64"), "error: --context: applies to the language model; add --lm-precision"),
        (("--kv-cache", "int8"), "error: --kv-cache: applies to the language model; add --lm-precision"),
        (
            ("--lm-precision", "int4", "--lm-device", "cuda", "--kv-cache", "int8"),
            "error: --kv-cache int8: an INT8 KV cache is built for the CPU decoder only",
        ),
    ],
)
def test_decoder_options_that_cannot_apply_are_one_line(plain_checkpoint, tmp_path, args, says):
    out = tmp_path / "b"
    result = _build("--model", str(plain_checkpoint), *args, "-o", str(out))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith(says)
    assert not out.exists()


def test_decoder_options_check_their_own_values():
    with pytest.raises(ConfigError) as error:
        DecoderOptions(context=0)
    assert error.value.field == "context"
    with pytest.raises(ConfigError) as error:
        DecoderOptions(kv_cache="int4")
    assert error.value.field == "kv_cache"
    assert DecoderOptions().extra_options() == ["prune_lm_head=true"]
    with pytest.raises(ConfigError):
        DecoderOptions(kv_cache="int8").extra_options()  # no calibrated scales


def test_the_parity_prompt_fits_a_small_context():
    assert workflow.parity_lengths(4096) == (24, 32)
    for context in (1, 2, 10, 55, 56):
        prompt, steps = workflow.parity_lengths(context)
        assert prompt >= 1 and steps >= 1 and prompt + steps - 1 <= context


# ---------------------------------------------------------------- the INT8 KV bounds and scales


def test_int8_kv_bounds_add_to_the_weights_bounds():
    fp32 = bounds_for("fp32", "int8")
    assert fp32.max_kl_mean == DEFAULT_BOUNDS["fp32"].max_kl_mean + KV_INT8_BOUNDS.max_kl_mean
    assert fp32.min_top1_agreement == KV_INT8_BOUNDS.min_top1_agreement
    assert bounds_for("int4", "fp") == DEFAULT_BOUNDS["int4"]


def test_the_scale_file_is_the_builders_format():
    keys = np.array([[1.0, 2.0, 4.0, 0.0], [3.0, 1.0, 1.0, 1.0]])
    ranges = KVRanges(keys, keys / 2, tokens=7)
    channel = ranges.scales("int8_per_channel")
    assert channel["qmax"] == QMAX == 128.0 and channel["layer_ids"] == [0, 1]
    assert HEADROOM == 1.5  # the thresholds: 1.5x the calibration maximum (a floor for a silent channel)
    assert np.allclose(channel["scales"]["k_scales"][0], [1.5 / 128, 3 / 128, 6 / 128, 1e-6 / 128])
    tensor = ranges.scales("int8_per_tensor")
    assert np.allclose(tensor["scales"]["k_scales"], [6 / 128, 4.5 / 128])
    assert np.allclose(tensor["scales"]["v_scales"], [3 / 128, 2.25 / 128])


def test_the_key_envelope_bounds_every_rotary_position():
    """A key channel's threshold is its rotary pair's norm: it bounds the channel at any position,
    where the raw maximum over a short prompt does not."""
    rng = np.random.default_rng(0)
    head = 8
    key = rng.standard_normal(head)
    inv_freq = 1.0 / 10000 ** (np.arange(0, head, 2) / head)
    envelope = pair_envelope(key[None, None, :], head)[0, 0]
    seen = []
    for position in range(4096):
        cos, sin = np.cos(position * inv_freq), np.sin(position * inv_freq)
        first, second = key[: head // 2], key[head // 2 :]
        rotated = np.concatenate([first * cos - second * sin, first * sin + second * cos])
        assert (np.abs(rotated) <= envelope + 1e-12).all()
        seen.append(np.abs(rotated))
    short = np.max(seen[:16], axis=0)
    assert (np.max(seen, axis=0) > short * 1.5).any()  # the slow pairs turn only later


# ---------------------------------------------------------------- decoders built from the tiny checkpoint


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, plain_checkpoint):
    return language_model_dir(plain_checkpoint, tmp_path_factory.mktemp("lm") / "hf")


@pytest.fixture(scope="module")
def int8_kv(tmp_path_factory, plain_checkpoint):
    """`export_into` with a context of 64 and an INT8 KV cache: the unquantized-KV decoder (pruned,
    the default; in scratch), its calibration, the rebuild with the INT8 cache."""
    stage, scratch = tmp_path_factory.mktemp("stage"), tmp_path_factory.mktemp("scratch")
    options = DecoderOptions(context=64, kv_cache="int8")
    exported = workflow.export_into(plain_checkpoint, stage, scratch, "fp32", "cpu", decoder=options)
    return exported, stage, scratch


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, hf_dir, int8_kv):
    """FP32 decoders of the same weights and FP32 caches: the LM head on every position (the model's
    context), and pruned with a context of 64 (the build's defaults but the context)."""
    root = tmp_path_factory.mktemp("decoders")
    workflow.write_language_model(hf_dir, root / "every", "fp32", "cpu", None, DecoderOptions(prune_lm_head=False))
    return {"every": LanguageModel(root / "every"), "last64": LanguageModel(int8_kv[2] / "lm-fp-kv")}


def _reference(hf_dir, prompt_ids: np.ndarray, steps: int):
    """Hugging Face's greedy answer and its teacher-forced next-token logits."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    table = model.model.embed_tokens.weight.detach()
    ids = torch.from_numpy(prompt_ids)
    with torch.no_grad():
        fed = table[ids][None]
        answer = []
        for _ in range(steps):  # greedy, no end of sequence
            answer.append(int(model(inputs_embeds=fed).logits[0, -1].argmax()))
            fed = torch.cat([fed, table[answer[-1]][None, None]], dim=1)
        forced = model(inputs_embeds=fed[:, :-1]).logits[0, -steps:].numpy()
    return answer, forced


def test_a_pruned_decoder_returns_one_position_and_the_same_teacher_forced_figures(decoders, hf_dir):
    every, last = decoders["every"], decoders["last64"]
    assert not every._last_position_only() and last._last_position_only()
    prompt_ids = np.random.default_rng(1).integers(0, 127, 20)
    prompt = every.embed(prompt_ids)
    assert last.new_cache().step(prompt, every_position=True).shape == (1, 128)  # the last position's only
    assert every.new_cache().step(prompt, every_position=True).shape == (20, 128)

    answer, forced = _reference(hf_dir, prompt_ids, 16)
    ours_every = every.answer_logits(prompt, answer)
    ours_last = last.answer_logits(prompt, answer)  # steps token by token
    assert ours_last.shape == ours_every.shape == (16, 128)
    assert np.abs(ours_last - ours_every).max() <= 1e-5
    assert np.abs(ours_last - forced).max() <= 1e-4 * np.abs(forced).max()
    figures = [lm_parity.teacher_forced(lm, prompt, answer, forced) for lm in (every, last)]
    for name in ("kl_mean", "kl_p99", "kl_max", "delta_p_mean", "delta_p_min"):
        assert abs(getattr(figures[0], name) - getattr(figures[1], name)) <= 1e-5
    assert figures[0].top1_agreement == figures[1].top1_agreement == 1.0
    assert figures[1].kl_max <= 1e-6  # FP32: Hugging Face's distributions


def test_the_context_sizes_the_kv_cache_and_refuses_a_longer_prompt(decoders):
    every, last = decoders["every"], decoders["last64"]
    assert every.context_length == 2048 and last.context_length == 64
    cache = last.new_cache()
    assert cache.nbytes == 64 * 2 * 2 * 2 * 16 * 4  # tokens x (K, V) x layers x kv heads x head size x FP32
    cache.step(last.embed(np.arange(64) % 127))  # 64 tokens fit
    with pytest.raises(BundleError, match="65 tokens exceed the context of 64"):
        last.new_cache().step(last.embed(np.arange(65) % 127))


def test_an_int8_kv_cache_quarters_the_bytes_and_stays_within_its_bounds(int8_kv, hf_dir):
    exported, stage, scratch = int8_kv
    record = exported.decoder
    assert record is not None and record["kv_cache"] == "int8" and record["kv_scheme"] == "int8_per_channel"
    validate_record(DecoderRecord, record, "language_model.decoder")  # the manifest's schema takes it
    scales = json.loads((stage / record["kv_scales"]).read_text())
    assert len(scales["scales"]["k_scales"]) == 2 and len(scales["scales"]["k_scales"][0]) == 2 * 16
    quantized, reference = LanguageModel(stage / "lm"), LanguageModel(scratch / "lm-fp-kv")
    assert np.dtype(quantized.kv_dtype) == np.int8 and np.dtype(reference.kv_dtype) == np.float32
    assert quantized.new_cache().nbytes * 4 == reference.new_cache().nbytes
    assert record["kv_bytes_per_token"] == 2 * 2 * 2 * 16  # (K, V) x layers x kv heads x head size x 1 byte
    assert not exported.failures

    prompt_ids = np.random.default_rng(2).integers(0, 127, 24)
    answer, forced = _reference(hf_dir, prompt_ids, 24)
    prompt = reference.embed(prompt_ids)
    ours = quantized.answer_logits(prompt, answer)
    unquantized = reference.answer_logits(prompt, answer)
    error = np.abs(ours - unquantized).max() / np.abs(unquantized).max()
    assert 0 < error < 0.05  # quantized, and close
    vs_hf = next_token_figures(forced, ours, np.asarray(answer))
    assert not violations(vs_hf, None, bounds_for("fp32", "int8"))
    unquantized_vs_hf = next_token_figures(forced, unquantized, np.asarray(answer))
    assert vs_hf.kl_mean > 10 * unquantized_vs_hf.kl_mean  # the INT8 cache's own error, measured


def test_the_in_place_int8_cache_computes_what_a_growing_one_does(int8_kv):
    """ONNX Runtime's CPU GroupQueryAttention with an INT8 cache, past and present bound to one
    buffer (the runtime's way) against the same decoder fed its whole cache back each step."""
    _, stage, _ = int8_kv
    lm = LanguageModel(stage / "lm")
    inputs, outputs = lm.names
    ids = np.random.default_rng(3).integers(0, 127, 12)
    cache = lm.new_cache()
    in_place = [cache.step(lm.embed(ids[:8]))] + [cache.step(lm.embed([token])) for token in ids[8:]]
    names = [o.name for o in lm.decoder.get_outputs()]
    empty = np.zeros((1, lm.kv_heads, 0, lm.head_size), np.int8)
    past = {inputs[k] % n: empty for n in range(lm.layers) for k in ("past_key_names", "past_value_names")}
    fed, total, growing = ids[:8], 8, []
    for token in [None, *ids[8:]]:
        x = lm.embed(fed if token is None else [token])
        total += 0 if token is None else 1
        feeds = {inputs["inputs_embeds"]: x, inputs["attention_mask"]: np.ones((1, total), np.int64), **past}
        result = dict(zip(names, lm.decoder.run(names, feeds), strict=True))
        growing.append(result[outputs["logits"]][0, -1])
        past = {
            inputs[k] % n: result[outputs[p] % n]
            for n in range(lm.layers)
            for k, p in (("past_key_names", "present_key_names"), ("past_value_names", "present_value_names"))
        }
    assert np.abs(np.stack(in_place) - np.stack(growing)).max() <= 1e-5


def test_the_int8_cache_batches_as_it_runs_alone(int8_kv):
    """Continuous batching over INT8 KV rows: three prompts decoded together in one pool give, at
    every step, the logits each gives alone (the rows' scales are per channel, not per row)."""
    from ccra_export.runtime.batching import ContinuousBatcher
    from ccra_export.runtime.language_model import KVPool

    _, stage, _ = int8_kv
    lm = LanguageModel(stage / "lm")
    assert np.dtype(lm.kv_dtype) == np.int8
    rng = np.random.default_rng(5)
    prompts = [lm.embed(rng.integers(0, 127, n).tolist()) for n in (3, 11, 6)]
    alone = [lm.generate(p, Sampling(max_new_tokens=8)) for p in prompts]
    batcher = ContinuousBatcher(lm, KVPool(lm, 3))
    try:
        with batcher._wake:  # queued together: decoded together
            futures = [batcher.submit(batcher.pool.acquire(), p, Sampling(max_new_tokens=8)) for p in prompts]
        together = [future.result(60) for future in futures]
    finally:
        batcher.close()
    assert batcher.batched_tokens > batcher.steps
    for solo, batched in zip(alone, together, strict=True):
        assert batched.tokens == solo.tokens
        np.testing.assert_allclose(batched.first_logits, solo.first_logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- through the CLI, with `check`


@pytest.mark.slow
def test_build_with_a_context_and_an_int8_kv_cache_then_check(plain_checkpoint, tmp_path):
    out = tmp_path / "b"
    args = ["--model", str(plain_checkpoint), "--lm-precision", "fp32", "--context", "64", "--kv-cache", "int8"]
    result = _build(*args, "-o", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    decoder = manifest["language_model"]["decoder"]
    assert decoder["context_length"] == 64 and decoder["model_context"] == 2048 and decoder["prune_lm_head"]
    assert decoder["kv_cache"] == "int8" and "lm/kv_scales.json" in manifest["files"]
    genai = json.loads((out / "lm" / "decoder" / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == genai["search"]["max_length"] == 64
    assert LanguageModel(out / "lm").context_length == 64
    check = CliRunner().invoke(main, ["check", "--bundle", str(out), "--reference", "recorded"])
    assert check.exit_code == 0, check.output
    # a bundle recorded before the decoder record (format 3 all the same) still opens
    del manifest["language_model"]["decoder"]
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert CliRunner().invoke(main, ["check", "--bundle", str(old), "--reference", "recorded"]).exit_code == 0
