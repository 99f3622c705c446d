"""The fused LPWCA path: folding, the torch op, the C++ CPU kernel, the ONNX node, ONNX Runtime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from ccra_export.core.config import preset
from ccra_export.core.errors import ConfigError
from ccra_export.core.hashing import sha256_file
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.core.sample_inputs import random_inputs
from ccra_export.export.fp16 import convert_to_fp16
from ccra_export.export.graph_checks import GraphCheckError, check_graph
from ccra_export.export.onnx_export import export_model_proto, save_model
from ccra_export.model.lpwca_fused import LIMIT_HEADS, LIMIT_LAYERS, fold_query, lpwca
from ccra_export.model.vision_model import build_model, reference_outputs
from ccra_export.runtime.lpwca_cpu import LpwcaKernelError, kernel_limits, lpwca_cpu
from ccra_export.runtime.vision_backend import OrtBackend


def _case(seed: int, batch=2, offset=0.0, scale=1.0, config=None):
    config = config or preset("tiny")
    model = build_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    c = config.ccra
    features = torch.randn(batch, c.num_layers, config.num_patches, config.vision.hidden_size, generator=gen)
    features = features * scale + offset
    text = torch.randn(batch, 7, c.text_hidden_size, generator=gen)
    mask = torch.ones(batch, 7, dtype=torch.int64)
    mask[-1, 4:] = 0
    with torch.no_grad():
        q = model.ccra.text_query(text, mask)
        want = model.ccra.lpwca(features, q)  # the plain, unfolded reference
        weights, bias = fold_query(model.ccra, q)
    attrs = dict(
        num_heads=c.num_heads, epsilon=c.layer_norm_eps, head_scale=c.head_dim**-0.5, layer_scale=c.attn_dim**-0.5
    )
    return features, weights, bias, attrs, want


def _close(got, want, rel=2e-5):
    got, want = np.asarray(got, np.float64), want.double().numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= rel * np.abs(want).max()


WIDE = dataclasses.replace(
    preset("tiny"),
    ccra=dataclasses.replace(preset("tiny").ccra, feature_layers=(1, 2, 3, 4), attn_dim=48, num_heads=6),
)


@pytest.mark.parametrize(
    ("seed", "offset", "scale", "config"),
    [(0, 0.0, 1.0, None), (1, 300.0, 40.0, None), (2, -5.0, 0.1, WIDE)],
    ids=["unit", "large-magnitude", "6-heads-4-layers"],
)
class TestFoldedEqualsPlain:
    def test_torch_op(self, seed, offset, scale, config):
        features, weights, bias, attrs, (want_f, want_a) = _case(seed, offset=offset, scale=scale, config=config)
        got_f, got_a = lpwca(features, weights, bias, **attrs)
        _close(got_f, want_f)
        _close(got_a, want_a)

    def test_cpp_cpu_kernel(self, seed, offset, scale, config):
        features, weights, bias, attrs, (want_f, want_a) = _case(seed, offset=offset, scale=scale, config=config)
        got_f, got_a = lpwca_cpu(features.numpy(), weights.numpy(), bias.numpy(), **attrs)
        _close(got_f, want_f)
        _close(got_a, want_a)


def test_folded_queries_are_laid_out_as_the_kernels_read_them():
    """The CPU and CUDA kernels read raw [B, H+1, Dv] and [B, L, H] buffers (data_ptr): the folded
    tensors must be contiguous in exactly that order, not a transpose's view of another."""
    features, weights, bias, attrs, _ = _case(3)
    batch, layers, heads = features.shape[0], features.shape[1], attrs["num_heads"]
    assert weights.is_contiguous() and bias.is_contiguous()
    assert bias.shape == (batch, layers, heads) and bias.stride() == (layers * heads, heads, 1)
    raw = np.frombuffer(bias.numpy().tobytes(), np.float32).reshape(batch, layers, heads)  # as a kernel reads it
    np.testing.assert_array_equal(raw, bias.numpy())


def test_cpu_kernel_takes_fp16_features_returns_fp16_features_and_an_fp32_map():
    features, weights, bias, attrs, (want_f, want_a) = _case(3)
    got_f, got_a = lpwca_cpu(features.numpy().astype(np.float16), weights.numpy(), bias.numpy(), **attrs)
    assert got_f.dtype == np.float16 and got_a.dtype == np.float32
    assert compare_output("F", got_f, want_f.numpy(), thresholds_for("fp16")).passed
    assert compare_output("A", got_a, want_a.numpy(), thresholds_for("fp16")).passed


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda v, w, b: (v, w[:, :-1], b), "query_weights has 4 rows; num_heads 4 needs 5"),
        (lambda v, w, b: (v, w[:1], b), "batch differs between inputs"),
        (lambda v, w, b: (v, w[..., :-2], b), "query_weights width 62 != features width 64"),
        (lambda v, w, b: (v, w, b[:, :2]), "query_bias must be [B, L=3, H=4]"),
        (lambda v, w, b: (v[0], w, b), "expected ranks 4/3/3"),
    ],
)
def test_cpu_kernel_refuses_inconsistent_inputs(mutate, message):
    features, weights, bias, attrs, _ = _case(4)
    with pytest.raises(LpwcaKernelError) as info:
        lpwca_cpu(*mutate(features.numpy(), weights.numpy(), bias.numpy()), **attrs)
    assert message in str(info.value)


def test_python_limits_match_the_compiled_kernel():
    assert kernel_limits() == (LIMIT_HEADS, LIMIT_LAYERS)


def test_export_refuses_more_heads_than_the_kernel_supports():
    config = dataclasses.replace(
        preset("tiny"), ccra=dataclasses.replace(preset("tiny").ccra, attn_dim=34, num_heads=17)
    )
    with pytest.raises(ConfigError, match=r"supports 1\.\.16 heads, the model has 17"):
        export_model_proto(build_model(config, seed=0), lpwca="fused")


@pytest.fixture(scope="module")
def model():
    return build_model(preset("tiny"), seed=5)


@pytest.fixture(scope="module")
def fused_path(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("fused") / "vision.onnx"
    save_model(export_model_proto(model, lpwca="fused"), path, "never")
    return path


class TestFusedGraph:
    def test_one_node_with_plugin_attributes(self, fused_path):
        check_graph(fused_path)  # full check with the registered schema
        graph = onnx.load(str(fused_path)).graph
        nodes = [n for n in graph.node if n.op_type == "LPWCA"]
        assert len(nodes) == 1 and nodes[0].domain == "ccra"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"ccra"
        assert attrs["num_heads"] == 4
        assert attrs["head_scale"] == pytest.approx(8**-0.5) and attrs["layer_scale"] == pytest.approx(32**-0.5)
        # stages 2-3 are gone from the graph: only stage 1 and 4 softmaxes remain
        assert sum(n.op_type == "Softmax" for n in graph.node) == 5  # 3 tower layers + text pooling + patch attention

    @pytest.mark.parametrize(("batch", "text_len"), [(1, 1), (3, 19)])
    def test_runs_in_onnxruntime_and_matches_pytorch(self, model, fused_path, batch, text_len):
        feeds = random_inputs(model.config, batch=batch, text_len=text_len, seed=batch)
        want = reference_outputs(model, feeds)
        before = sha256_file(fused_path)
        got = OrtBackend(fused_path).run(feeds)
        assert sha256_file(fused_path) == before  # the rewrite for ORT happens in memory only
        for name in want:
            result = compare_output(name, got[name], want[name], thresholds_for("fp32"))
            assert result.passed, result.failures

    def test_external_data(self, tmp_path, model):
        path = tmp_path / "vision.onnx"
        save_model(export_model_proto(model, lpwca="fused"), path, "always")
        feeds = random_inputs(model.config, batch=2, text_len=4, seed=9)
        got = OrtBackend(path).run(feeds)["visual_tokens"]
        assert compare_output("v", got, reference_outputs(model, feeds)["visual_tokens"], thresholds_for("fp32")).passed

    def test_fp16_feeds_the_node_fp16_features(self, tmp_path, model):
        path = tmp_path / "vision.onnx"
        save_model(convert_to_fp16(export_model_proto(model, lpwca="fused")), path, "never")
        check_graph(path)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
        node = next(n for n in inferred.graph.node if n.op_type == "LPWCA")
        F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
        assert [types[i] for i in node.input] == [F16, F32, F32]
        assert [types[o] for o in node.output] == [F16, F32]  # the attention map is FP32 whatever the features
        feeds = random_inputs(model.config, batch=2, text_len=6, seed=2)
        got, want = OrtBackend(path).run(feeds), reference_outputs(model, feeds)
        for name in want:
            assert compare_output(name, got[name], want[name], thresholds_for("fp16")).passed

    def test_bad_node_fails_the_checker_in_one_line(self, tmp_path, fused_path):
        proto = onnx.load(str(fused_path))
        node = next(n for n in proto.graph.node if n.op_type == "LPWCA")
        next(a for a in node.attribute if a.name == "num_heads").i = 3  # query_weights has 5 rows
        onnx.save(proto, str(tmp_path / "bad.onnx"))
        with pytest.raises(GraphCheckError, match="query_weights has 5 rows; num_heads 3 needs 4"):
            check_graph(tmp_path / "bad.onnx")
