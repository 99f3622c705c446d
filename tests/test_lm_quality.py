"""Next-token quality figures (runtime/lm_quality.py) against PyTorch's own KL divergence and softmax."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ccra_export.core.lm_quality import QualityBounds, next_token_figures, violations


def _reference_figures(ref: np.ndarray, ours: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    log_ref = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    log_ours = torch.log_softmax(torch.from_numpy(ours).double(), -1)
    kl = torch.nn.functional.kl_div(log_ours, log_ref, log_target=True, reduction="none").sum(-1)
    top = log_ref.argmax(-1)
    delta = log_ours.exp().gather(1, top[:, None])[:, 0] - log_ref.exp().gather(1, top[:, None])[:, 0]
    return kl.numpy(), (log_ours.argmax(-1) == top).numpy(), delta.numpy()


def test_figures_match_pytorch():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((200, 350)).astype(np.float32) * 4
    ours = ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.3
    got = next_token_figures(ref, ours)
    kl, agree, delta = _reference_figures(ref, ours)
    assert got.positions == 200
    assert got.kl_mean == pytest.approx(kl.mean(), rel=1e-9)
    assert got.kl_max == pytest.approx(kl.max(), rel=1e-9)
    assert got.kl_p99 == pytest.approx(np.percentile(kl, 99), rel=1e-9)
    assert got.top1_agreement == pytest.approx(agree.mean())
    assert got.delta_p_mean == pytest.approx(delta.mean(), abs=1e-12) and got.delta_p_min == pytest.approx(delta.min())
    assert 0 < got.top1_agreement < 1 and got.kl_mean > 0  # the noise is large enough to be seen


def test_identical_logits_are_perfect_and_large_logits_do_not_overflow():
    ref = np.array([[1e4, 0.0, -1e4], [3.0, 2.0, 1.0]], np.float32)
    got = next_token_figures(ref, ref.copy())
    assert (got.kl_max, got.top1_agreement, got.delta_p_min) == (0.0, 1.0, 0.0)


def test_teacher_forced_next_tokens_set_delta_p():
    ref = np.log(np.array([[0.7, 0.2, 0.1]]))
    ours = np.log(np.array([[0.6, 0.3, 0.1]]))
    assert next_token_figures(ref, ours).delta_p_mean == pytest.approx(-0.1)
    assert next_token_figures(ref, ours, np.array([1])).delta_p_mean == pytest.approx(0.1)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="one shape"):
        next_token_figures(np.zeros((2, 3)), np.zeros((2, 4)))


def test_violations_name_each_broken_bound():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((50, 40)) * 6  # confident enough that top-1 is bounded at most positions
    figures = next_token_figures(ref, ref + rng.standard_normal(ref.shape) * 3)
    assert figures.confident_positions > 0 and figures.confident_top1_agreement < 1.0
    strict = QualityBounds(max_kl_mean=1e-6, max_kl_p99=1e-6, min_top1_agreement=1.0, max_flip_rate=0.0)
    found = violations(figures, 0.5, strict)
    assert [f.split(" ")[0] for f in found] == ["mean", "p99", "top-1", "greedy"]
    loose = QualityBounds(max_kl_mean=10, max_kl_p99=10, min_top1_agreement=0.0, max_flip_rate=1.0)
    assert violations(figures, 0.5, loose) == []
    with pytest.raises(ValueError, match="max_kl_mean"):
        QualityBounds(max_kl_mean=float("nan"), max_kl_p99=1, min_top1_agreement=0.5, max_flip_rate=0.1)


def test_top1_is_bounded_only_where_the_reference_is_sure():
    """A near-flat reference (a random model) flips its argmax on rounding: not a defect. A confident
    one that flips is."""
    flat = np.array([[0.0, 1e-3, 0.0], [1e-3, 0.0, 0.0]])
    flipped = flat[:, [1, 0, 2]]
    figures = next_token_figures(flat, flipped)
    assert figures.top1_agreement == 0.0 and figures.confident_positions == 0
    assert figures.confident_top1_agreement is None
    bounds = QualityBounds(max_kl_mean=100, max_kl_p99=100, min_top1_agreement=0.9, max_flip_rate=0.0)
    assert violations(figures, None, bounds) == []
    sure = np.array([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    figures = next_token_figures(sure, sure[:, [1, 0, 2]])
    assert figures.confident_positions == 2 and figures.confident_top1_agreement == 0.5
    assert [f.split(" ")[0] for f in violations(figures, None, bounds)] == ["top-1"]


# --- the bounds at work on real builds -------------------------------------------------------------


def test_the_demo_int4_build_is_within_its_bounds_and_check_recomputes_them(demo_bundle):
    """The README's main job (FP16 vision, INT4 decoder) passes the INT4 bounds, its table says which
    rows are checked, and `check` (recorded reference, no PyTorch needed) recomputes the same figures."""
    import json

    from click.testing import CliRunner

    from ccra_export.cli import main
    from ccra_export.core.lm_quality import bounds_for

    built = json.loads((demo_bundle / "parity.json").read_text())
    forced = built["language_model"]["next_token"]
    quant = json.loads((demo_bundle / "manifest.json").read_text())["language_model"]["quant"]
    assert quant == {"recipe": "k_quant_mixed", "block_size": 32, "accuracy_level": None}  # --lm-quant auto
    bounds = bounds_for("int4")
    assert built["passed"] and forced["positions"] == 32 and forced["confident_positions"] > 0
    assert forced["kl_mean"] <= bounds.max_kl_mean and forced["kl_p99"] <= bounds.max_kl_p99
    assert 0 < forced["kl_mean"]  # INT4 is not lossless: the figure measures something
    result = CliRunner().invoke(main, ["check", "--bundle", str(demo_bundle), "--reference", "recorded"])
    assert result.exit_code == 0, result.output
    assert "next-token KL, mean" in result.output and f"<= {bounds.max_kl_mean:g}" in result.output
    rechecked = json.loads((demo_bundle / "parity.json").read_text())  # check does not rewrite it
    assert rechecked == built


def test_a_quantization_hostile_checkpoint_fails_int4(tmp_path):
    """Outlier channels folded into the decoder's layers: the FP32 model computes the same logits, but
    round-to-nearest INT4 loses them. Before the bounds this build printed 'parity passed'."""
    import json

    import torch
    from click.testing import CliRunner
    from transformers import LlavaForConditionalGeneration

    from ccra_export.cli import main
    from ccra_export.core.lm_quality import bounds_for
    from ccra_export.demo import CHECKPOINT
    from tests.hostile_checkpoint import make_hostile

    hostile = make_hostile(CHECKPOINT, tmp_path / "hostile")
    ids = torch.arange(5, 40)[None]
    logits = [
        LlavaForConditionalGeneration.from_pretrained(str(p), dtype=torch.float32).eval()(input_ids=ids).logits
        for p in (CHECKPOINT, hostile)
    ]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)  # the same FP32 function
    args = ["build", "--model", str(hostile), "--precision", "fp32", "--lm-precision", "int4"]
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "b")])
    assert result.exit_code == 3, result.output
    assert "parity FAILED: language model: mean next-token KL" in result.output
    figures = json.loads((tmp_path / "b" / "parity.json").read_text())["language_model"]["next_token"]
    assert figures["kl_mean"] > 10 * bounds_for("int4").max_kl_mean


def test_auto_recipe_is_k_quant_mixed_for_int4_where_the_widths_allow_it():
    from ccra_export.export.lm_export import LMQuant, MatMulWidths

    llava_7b = MatMulWidths(4096, 11008, 4096, 4096)
    assert LMQuant().resolved("int4", llava_7b).recipe == "k_quant_mixed"
    assert LMQuant(block_size=128).resolved("int4", llava_7b).recipe == "k_quant_mixed"  # 32 and 86 blocks
    assert LMQuant().resolved("int4", MatMulWidths(96, 192, 32, 96)).recipe == "default"  # groups of 64 do not fit
    # a 0.5B-class 896-wide model: 7 blocks of 128 per column, which the builder's packer cannot split
    assert LMQuant(block_size=128).resolved("int4", MatMulWidths(896, 4864, 128, 896)).recipe == "default"
    assert LMQuant(block_size=64).resolved("int4", MatMulWidths(896, 4864, 128, 896)).recipe == "k_quant_mixed"
    assert LMQuant().resolved("int8", llava_7b).recipe == "default"
    # 8-bit zero points take a byte each: no odd-block limit there
    assert LMQuant(recipe="k_quant", block_size=128).resolved("int8", MatMulWidths(896, 4864, 128, 896)).recipe == (
        "k_quant"
    )
    assert LMQuant(recipe="rtn", block_size=128).resolved("int4", MatMulWidths(96, 192, 32, 96)).recipe == "rtn"
    assert LMQuant(recipe="k_quant", block_size=128).extra_options() == ["algo_config=k_quant", "block_size=128"]


def test_an_explicit_k_quant_the_widths_cannot_take_is_refused_in_one_line():
    from ccra_export.core.errors import ConfigError
    from ccra_export.export.lm_export import LMQuant, MatMulWidths

    with pytest.raises(ConfigError) as raised:
        LMQuant(recipe="k_quant_mixed", block_size=128).resolved("int4", MatMulWidths(896, 4864, 128, 896))
    assert str(raised.value) == (
        "lm_quant k_quant_mixed: k-quant at 128-wide blocks needs an even number of blocks per column; "
        "896 gives an odd one (lm_block_size 64 fits)"
    )
    test_sized = MatMulWidths(96, 192, 32, 96)  # 3 blocks of 32, 6 of 16
    with pytest.raises(ConfigError, match="96 gives an odd one \\(lm_block_size 16 fits\\)"):
        LMQuant(recipe="k_quant").resolved("int4", test_sized)
    assert LMQuant(recipe="k_quant", block_size=16).resolved("int4", test_sized).recipe == "k_quant"
    with pytest.raises(ConfigError, match="80 gives an odd one \\(lm_block_size 64 fits\\)"):  # only a larger one
        LMQuant(recipe="k_quant", block_size=16).resolved("int4", MatMulWidths(80, 128, 32, 128))
    with pytest.raises(ConfigError, match="no block size fits; rtn or default does"):
        LMQuant(recipe="k_quant").resolved("int4", MatMulWidths(272, 128, 32, 128))  # 17 blocks of 16


def test_the_cli_refuses_the_block_size_before_anything_loads(tmp_path):
    from click.testing import CliRunner

    from ccra_export.cli import main

    out = tmp_path / "b"
    args = ["build", "--model", "demo", "--lm-precision", "int4", "--lm-quant", "k_quant_mixed", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--lm-block-size", "128"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: --lm-quant k_quant_mixed: k-quant at 128-wide blocks needs an even number of blocks per column; "
        "128, 384 gives an odd one (--lm-block-size 64 fits)"
    )
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hidden", "heads", "block", "builds"), [(256, 4, 128, True), (384, 6, 128, False), (96, 1, 16, True)]
)
def test_the_block_rule_is_the_builders_own(tmp_path, plain_checkpoint, hidden, heads, block, builds):
    """The refusal above is what onnxruntime-genai's builder does: k_quant at 128-wide blocks builds
    a 256-wide model (2 blocks per column) and fails inside on a 384-wide one (3); a 96-wide one, no
    multiple of 64, builds at 16 (6 blocks)."""
    import subprocess
    import sys

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ccra_export.export.lm_export import MatMulWidths, language_model_dir, matmul_widths

    lm_dir = language_model_dir(plain_checkpoint, tmp_path / "lm")  # its tokenizer; new weights below
    vocab = json.loads((lm_dir / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=heads,
        num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(lm_dir)
    assert matmul_widths(lm_dir) == MatMulWidths(hidden, 2 * hidden, hidden // heads, hidden)
    assert (matmul_widths(lm_dir).k_quant_refusal(block) is None) is builds
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(lm_dir), "-o", str(tmp_path / "out")]
    options = ["exclude_embeds=true", "algo_config=k_quant", f"block_size={block}"]
    ran = subprocess.run(
        [*command, "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache"), "--extra_options", *options],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (ran.returncode == 0) is builds, ran.stderr[-2000:]
    if not builds:
        assert "cannot reshape array" in ran.stderr


def test_nan_or_inf_logits_always_fail():
    """FP16 overflow gives NaN/Inf logits: no KL bound can pass them (NaN > bound is False)."""
    ref = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    ours = ref.copy()
    ours[1, 0] = np.inf
    figures = next_token_figures(ref, ours)
    assert figures.nonfinite_positions == 1 and np.isfinite(figures.kl_mean)
    loose = QualityBounds(max_kl_mean=100, max_kl_p99=100, min_top1_agreement=0.0, max_flip_rate=1.0)
    assert violations(figures, None, loose) == ["1 positions with NaN/Inf logits"]
