"""The llava-1.5-7b preset through the whole build (minutes on 2 cores, ~8 GB RAM): `-m slow`."""

from __future__ import annotations

import json

import pytest

from ccra_export.workflows.build import BuildOptions, ParityOptions, build_bundle

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("precision", "lpwca"), [("fp16", "portable"), ("fp32", "portable"), ("fp16", "fused")])
def test_llava_15_7b_builds_and_passes_parity(tmp_path, precision, lpwca):
    options = BuildOptions(
        model="llava-1.5-7b",
        output=tmp_path / "b",
        precision=precision,
        lpwca=lpwca,
        random_weights=True,
        backend="ort",
        parity=ParityOptions(batch=1, text_len=24),
    )
    result = build_bundle(options)
    assert result.report.passed, result.report.failure_summary()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["ccra_parameters"] == 3_489_280
    shapes = {o["name"]: o["shape"] for o in manifest["graph"]["outputs"]}
    assert shapes == {"visual_tokens": ["batch", 576, 4096], "lpwca_attention": ["batch", 23, 576]}
