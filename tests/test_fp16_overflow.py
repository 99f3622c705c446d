"""FP16 graphs on activations that reach FP16's range: CLIP-like outlier channels in the residual
stream and a sharp LPWCA map (its peak far above uniform), as trained checkpoints have.

ONNX Runtime's converter alone, with the blocks this project always used (Softmax and the CCRA
module), turns every visual token into NaN: it casts each FP32 node's outputs back to FP16, so
the tensors inside the "FP32" island pass through FP16 anyway. Our conversion removes those
round trips and keeps FP32 every node around a tensor the FP32 graph showed beyond FP16's safe
range; parity then passes. Tiny size here, llava-1.5-7b size under -m slow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnxruntime.transformers import float16

from ccra_export.core.config import preset
from ccra_export.core.graph_scopes import CCRA_SCOPE, nodes_in_scope
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.core.sample_inputs import random_inputs
from ccra_export.export.fp16 import convert_to_fp16
from ccra_export.export.fp16_ranges import SAFE_BOUND, activation_ranges, over_range
from ccra_export.export.onnx_export import export_model_proto, save_model
from ccra_export.model.fp16_emulation import half_precision_outputs
from ccra_export.model.vision_model import build_model, reference_outputs
from ccra_export.runtime.vision_backend import OrtBackend


def outlier_model(name: str, lpwca: str = "portable"):
    """Random weights plus two outlier channels written by every CLIP MLP and a sharp text query."""
    model = build_model(preset(name), seed=0)
    with torch.no_grad():
        for layer in model.vision_tower.encoder.layers:
            layer.mlp.fc2.weight[:2] *= 400.0
            layer.mlp.fc2.bias[:2] += 300.0
        model.ccra.query.weight.mul_(40.0)
    model.ccra.lpwca_impl = lpwca
    return model


def _visual_tokens(path, feeds) -> np.ndarray:
    return OrtBackend(path).run(feeds)["visual_tokens"].astype(np.float32)


def check_overflow_is_fixed(tmp_path, name: str, lpwca: str, batch: int, text_len: int) -> dict:
    model = outlier_model(name, lpwca)
    config = preset(name)
    feeds = random_inputs(config, batch=batch, text_len=text_len, seed=0)
    want = reference_outputs(model, feeds)
    attention = want["lpwca_attention"]
    uniform = 1.0 / attention[0].size
    assert attention.max() > 15 * uniform  # a peaked map, as the issue reproduced (0.5 vs 0.016)

    proto = export_model_proto(model, lpwca=lpwca)
    save_model(proto, tmp_path / "fp32.onnx", "auto")
    # the conversion this project used before: ONNX Runtime's converter with the same blocks
    blocked = nodes_in_scope(proto, CCRA_SCOPE) + [n.name for n in proto.graph.node if n.op_type == "LPWCA"]
    before = float16.convert_float_to_float16(
        export_model_proto(model, lpwca=lpwca),
        keep_io_types=False,
        op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "Softmax"],
        node_block_list=blocked,
    )
    if lpwca == "portable":  # checked on the portable graph; the fused one is checked after the fix only
        save_model(before, tmp_path / "before.onnx", "auto")
        assert not np.isfinite(_visual_tokens(tmp_path / "before.onnx", feeds)).all()

    over = over_range(proto, activation_ranges(tmp_path / "fp32.onnx", feeds))
    assert over and all(o.max_abs > SAFE_BOUND for o in over)
    kept_nodes = {node for o in over for node in o.nodes}
    fixed = convert_to_fp16(proto, keep_nodes=sorted(kept_nodes))
    save_model(fixed, tmp_path / "fp16.onnx", "auto")
    got = _visual_tokens(tmp_path / "fp16.onnx", feeds)
    result = compare_output("visual_tokens", got, want["visual_tokens"], thresholds_for("fp16"))
    assert result.nonfinite == 0 and result.passed, result.failures
    # FP16 arithmetic emulated in PyTorch half on the CPU: with the graph's islands (module
    # granularity) it holds; with none (what weak typing with the FP16 flag risks) CCRA overflows
    stages = [m for m in ("vision_tower", "multi_modal_projector") if set(nodes_in_scope(proto, m)) & kept_nodes]
    with_islands = half_precision_outputs(model, feeds, fp32_modules=["ccra", *stages])
    tokens = with_islands["visual_tokens"]
    islands_row = compare_output("visual_tokens", tokens, want["visual_tokens"], thresholds_for("fp16"))
    assert islands_row.passed, islands_row.failures
    if lpwca == "portable":  # the fused op accumulates in FP32 whatever its input type, as the kernels do
        without = half_precision_outputs(model, feeds)
        assert not np.isfinite(without["visual_tokens"]).all()
    return {"over": over, "cosine": result.cosine}


@pytest.mark.parametrize("lpwca", ["portable", pytest.param("fused", marks=pytest.mark.slow)])
def test_tiny_fp16_survives_outliers_and_a_sharp_map(tmp_path, lpwca):
    check_overflow_is_fixed(tmp_path, "tiny", lpwca, batch=2, text_len=8)


@pytest.mark.slow
@pytest.mark.parametrize("lpwca", ["portable", "fused"])
def test_llava_7b_size_fp16_survives_outliers_and_a_sharp_map(tmp_path, lpwca):
    check_overflow_is_fixed(tmp_path, "llava-1.5-7b", lpwca, batch=1, text_len=16)


def test_build_records_what_it_kept_fp32(tmp_path):
    """Every FP16 bundle's parity.json says which tensors were kept FP32 and why (an empty list too)."""
    import json

    from click.testing import CliRunner

    from ccra_export.cli import main

    result = CliRunner().invoke(main, ["build", "--model", "tiny", "--random-weights", "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    parity = json.loads((tmp_path / "b" / "parity.json").read_text())
    kept = parity["fp16_kept_fp32"]
    assert isinstance(kept, list)
    emulated = parity["emulated_fp16"]  # its own rows: the graph's islands (gating) and none (reported)
    assert emulated["graph_islands"]["visual_tokens"]["passed"] is True
    assert set(emulated["no_islands"]["visual_tokens"]) == {"cosine", "nonfinite", "passed"}
    assert all({"tensor", "max_abs", "nodes"} <= set(entry) and entry["max_abs"] > SAFE_BOUND for entry in kept)
