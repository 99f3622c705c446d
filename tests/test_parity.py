"""Parity metrics against hand-computed values, and the pass/fail rules."""

from __future__ import annotations

import math

import numpy as np

from ccra_export.core.parity import DEFAULT_THRESHOLDS, Thresholds, compare_output, compare_outputs


def test_metrics_match_hand_computation():
    ref = np.array([1.0, -2.0, 4.0, 0.0], np.float32)
    got = np.array([1.1, -2.0, 3.8, 0.001], np.float32)
    r = compare_output("y", got, ref, Thresholds(min_cosine=0.0))
    assert math.isclose(r.max_abs_err, 0.2, rel_tol=1e-6)
    assert math.isclose(r.scaled_max_abs_err, 0.2 / 4.0, rel_tol=1e-6)
    # relative error floor is 1e-3 * max|ref| = 4e-3: the 0 -> 0.001 element gives 0.25
    assert math.isclose(r.max_rel_err, 0.25, rel_tol=1e-5)
    a, b = got.astype(np.float64), ref.astype(np.float64)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert math.isclose(r.cosine, cos, rel_tol=1e-12)
    assert r.passed


def test_nan_and_inf_fail_even_with_good_cosine():
    ref = np.ones(1000, np.float32)
    got = ref.copy()
    got[3], got[7] = np.nan, np.inf
    r = compare_output("y", got, ref, DEFAULT_THRESHOLDS["fp16"])
    assert r.nonfinite == 2 and not r.passed and "2 NaN/Inf values" in r.failures


def test_fp32_scaled_error_threshold():
    ref = np.linspace(-10, 10, 101)
    assert compare_output("y", ref + 5e-4, ref, DEFAULT_THRESHOLDS["fp32"]).passed  # 5e-5 of scale 10
    failed = compare_output("y", ref + 2e-3, ref, DEFAULT_THRESHOLDS["fp32"])  # 2e-4 of scale
    assert not failed.passed and "max abs error / output scale" in failed.failures[0]


def test_shape_mismatch_fails():
    r = compare_output("y", np.zeros((2, 3)), np.zeros((3, 2)), DEFAULT_THRESHOLDS["fp16"])
    assert not r.passed and "shape" in r.failures[0]


def test_report_passes_only_when_every_output_passes():
    ref = {"a": np.arange(1, 5.0), "b": np.arange(1, 5.0)}
    bad = {"a": ref["a"], "b": -ref["b"]}
    report = compare_outputs(bad, ref, precision="fp16", backend="x", thresholds=DEFAULT_THRESHOLDS["fp16"])
    assert not report.passed and report.failure_summary().startswith("b: cosine -1.0000000")
    assert report.to_dict()["outputs"][0]["passed"] is True


def test_one_broken_visual_token_fails_though_the_whole_output_passes():
    """A TensorRT-Edge-LLM user saw mean cosine 0.995 with one visual token at 0.28: the global cosine
    hides it; the worst-token figures do not."""
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((2, 576, 64)).astype(np.float32)
    actual = reference + rng.standard_normal(reference.shape).astype(np.float32) * 0.002
    actual[1, 100] = rng.standard_normal(64)  # one token of the second image replaced
    result = compare_output("visual_tokens", actual, reference, DEFAULT_THRESHOLDS["fp16"])
    assert result.cosine > DEFAULT_THRESHOLDS["fp16"].min_cosine  # the global check alone passes
    a, b = actual[1, 100].astype(np.float64), reference[1, 100].astype(np.float64)
    assert math.isclose(result.worst_token_cosine, a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel_tol=1e-9)
    assert math.isclose(result.worst_token_rel_err, np.linalg.norm(a - b) / np.linalg.norm(b), rel_tol=1e-9)
    assert not result.passed and any("worst visual token cosine" in f for f in result.failures)
    clean = compare_output("visual_tokens", reference + 1e-4, reference, DEFAULT_THRESHOLDS["fp16"])
    assert clean.passed and clean.worst_token_cosine > 0.999


def test_token_checks_apply_to_visual_tokens_only_and_count_nan_as_worst():
    reference = np.ones((1, 4, 8), np.float32)
    broken = reference.copy()
    broken[0, 2, 0] = np.nan
    loose = Thresholds(min_cosine=-1.0, allow_nonfinite=True, min_token_cosine=0.5)
    assert compare_output("ccra_head: visual_tokens", broken, reference, loose).worst_token_cosine == -1.0
    assert compare_output("lpwca_attention", broken, reference, loose).worst_token_cosine is None
