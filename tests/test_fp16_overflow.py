"""FP16 graphs on activations that reach FP16's range: CLIP-like outlier channels in the residual
stream and a sharp LPWCA map (its peak far above uniform), as trained checkpoints have.

ONNX Runtime's converter alone, with the blocks this project always used (Softmax and the CCRA
module), turns every visual token into NaN: it casts each FP32 node's outputs back to FP16, so
the tensors inside the "FP32" island pass through FP16 anyway. Our conversion removes those
round trips and keeps FP32 every node around a tensor the FP32 graph showed beyond FP16's safe
range; parity then passes. Tiny size here, llava-1.5-7b size under -m slow.

The other end of FP16's range: a sharp map's small entries lie below FP16's smallest normal, as
most of the map does at llava-1.5-7b sizes (mean 1/(L*N) = 7.5e-5); FP16 bundles give the map in
FP32."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnxruntime.transformers import float16

from ccra_export.cli import main
from ccra_export.core.config import preset
from ccra_export.core.graph_scopes import CCRA_SCOPE, nodes_in_scope
from ccra_export.core.manifest import read_manifest
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.core.sample_inputs import random_inputs
from ccra_export.core.vision_graphs import (
    HEAD,
    LPWCA_ATTENTION,
    PIXEL_VALUES,
    TEXT_EMBEDS,
    TEXT_MASK,
    TOWER_FEATURES,
    part_records,
)
from ccra_export.export.fp16 import convert_to_fp16
from ccra_export.export.fp16_ranges import SAFE_BOUND, activation_ranges, over_range
from ccra_export.export.onnx_export import export_model_proto, save_model
from ccra_export.model.checkpoint import load_checkpoint, save_ccra_weights
from ccra_export.model.fp16_emulation import half_precision_outputs
from ccra_export.model.vision_model import build_model, part_module, reference_outputs
from ccra_export.runtime.backends import bundle_backend
from ccra_export.runtime.vision_backend import OrtBackend

FP16_SMALLEST_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1e-5


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
    outputs = {o["name"]: o["dtype"] for o in read_manifest(tmp_path / "b")["graph"]["outputs"]}
    assert outputs == {"visual_tokens": "float16", "lpwca_attention": "float32"}


@pytest.fixture(scope="module")
def sharp_map_checkpoint(tmp_path_factory, plain_checkpoint):
    """The tiny checkpoint with CCRA's text query scaled 12x: its map peaks near 0.25 and about a
    third of its entries lie below FP16's smallest normal (down to ~1e-10), where FP16 keeps a few
    bits or none."""
    path = tmp_path_factory.mktemp("ckpt") / "sharp-map"
    shutil.copytree(plain_checkpoint, path)
    model = build_model(preset("tiny"), seed=7)
    with torch.no_grad():
        model.ccra.query.weight.mul_(12.0)
    save_ccra_weights(model, path)
    return path


@pytest.mark.parametrize("lpwca", ["portable", "fused"])
def test_fp16_bundle_gives_the_lpwca_map_in_fp32_down_to_its_subnormal_entries(tmp_path, sharp_map_checkpoint, lpwca):
    """Measured here (tiny, CPU): the head's map within 6e-6 (portable) / 3e-5 (fused) relative of
    PyTorch's FP32 map at every entry; through an FP16 output the smallest entries were flushed to 0."""
    bundle = tmp_path / "b"
    args = ["build", "--model", str(sharp_map_checkpoint), "--precision", "fp16", "--lpwca", lpwca, "-o", str(bundle)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(bundle)
    tower, head = part_records(manifest)  # split by default: CCRA's head gives the map
    for outputs in (manifest["graph"]["outputs"], head["outputs"]):
        assert {o["name"]: o["dtype"] for o in outputs} == {"visual_tokens": "float16", "lpwca_attention": "float32"}
    model = load_checkpoint(sharp_map_checkpoint).model
    feeds = random_inputs(model.config, batch=2, text_len=6, seed=0)
    vision, _ = bundle_backend(bundle, manifest, "ort")
    end_to_end = vision.run(feeds)["lpwca_attention"]
    assert end_to_end.dtype == np.float32
    # The head against PyTorch's FP32 head on the same inputs (the FP16 tower's features, the FP16
    # instruction): what is left is the map's own path, CCRA in FP32 to the graph output.
    features = OrtBackend(bundle / tower["file"]).run({PIXEL_VALUES: feeds[PIXEL_VALUES]})[TOWER_FEATURES]
    head_feeds = {TOWER_FEATURES: features, TEXT_EMBEDS: feeds[TEXT_EMBEDS].astype(np.float16)}
    head_feeds[TEXT_MASK] = feeds[TEXT_MASK]
    got = OrtBackend(bundle / head["file"]).run(head_feeds)[LPWCA_ATTENTION]
    np.testing.assert_array_equal(got, end_to_end)  # the joined bundle runs exactly these graphs
    with torch.no_grad():
        inputs = [torch.from_numpy(head_feeds[k]).float() for k in (TOWER_FEATURES, TEXT_EMBEDS)]
        want = part_module(model, HEAD)(*inputs, torch.from_numpy(feeds[TEXT_MASK]))[1].double().numpy()
    small = want < FP16_SMALLEST_NORMAL
    assert small.sum() >= 20 and want.min() < 1e-8, "the map is not sharp enough to test its small entries"
    relative = np.abs(got - want) / want  # every entry, the smallest included
    smallest = np.argsort(want, axis=None)[:10]
    assert relative.max() < 1e-4, f"max relative error {relative.max():.2e}"
    assert relative.flat[smallest].max() < 1e-4
    # the same values through an FP16 output (what FP16 bundles gave before): the smallest entries
    # are subnormal with a few bits left, or flushed to zero
    as_fp16 = np.abs(got.astype(np.float16) - want) / want
    assert as_fp16.flat[smallest].max() > 0.5, f"FP16 output: {as_fp16.flat[smallest].max():.2e}"
