"""PyTorch -> ONNX export: dynamic axes, validity, external data, FP16 structure and accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from ccra_export.core import lpwca_schema
from ccra_export.core.config import preset
from ccra_export.core.graph_scopes import CCRA_SCOPE, in_scope
from ccra_export.core.parity import compare_output
from ccra_export.core.sample_inputs import random_inputs
from ccra_export.export.fp16 import convert_to_fp16
from ccra_export.export.graph_checks import check_graph, graph_interface
from ccra_export.export.onnx_export import export_model_proto, save_model
from ccra_export.model.vision_model import build_model, reference_outputs


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(preset("tiny"), seed=1)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("export") / "vision.onnx"
    save_model(export_model_proto(tiny_model), path, "never")
    return path


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("batch", "text_len"), [(1, 1), (3, 33), (5, 7)])
def test_fp32_graph_matches_pytorch_for_any_batch_and_text_length(tiny_model, tiny_fp32, batch, text_len):
    feeds = random_inputs(tiny_model.config, batch=batch, text_len=text_len, seed=batch)
    want = reference_outputs(tiny_model, feeds)
    got = dict(zip(["visual_tokens", "lpwca_attention"], _session(tiny_fp32).run(None, feeds), strict=True))
    for name in want:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5 * np.abs(want[name]).max())


def test_graph_is_valid_with_symbolic_axes(tiny_fp32):
    interface = graph_interface(check_graph(tiny_fp32))
    assert interface["opset"]["ai.onnx"] >= 17
    shapes = {spec["name"]: spec["shape"] for spec in interface["inputs"] + interface["outputs"]}
    assert shapes == {
        "pixel_values": ["batch", 3, 56, 56],
        "text_embeds": ["batch", "text_len", 96],
        "text_mask": ["batch", "text_len"],
        "visual_tokens": ["batch", 16, 96],
        "lpwca_attention": ["batch", 3, 16],
    }


def test_onnx_reference_evaluator_agrees_with_onnxruntime(tiny_model, tiny_fp32):
    """An independent executor of ONNX semantics: catches an ORT-specific kernel masking an export bug."""
    feeds = random_inputs(tiny_model.config, batch=2, text_len=5, seed=11)
    ref = ReferenceEvaluator(str(tiny_fp32)).run(None, feeds)
    got = _session(tiny_fp32).run(None, feeds)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_external_data_round_trip(tmp_path, tiny_model):
    path = tmp_path / "vision.onnx"
    files = save_model(export_model_proto(tiny_model), path, "always")
    assert files == ["vision.onnx", "vision.onnx.data"]
    assert (tmp_path / "vision.onnx.data").stat().st_size > 4 * path.stat().st_size
    check_graph(path)
    feeds = random_inputs(tiny_model.config, batch=2, text_len=4, seed=2)
    want = reference_outputs(tiny_model, feeds)["visual_tokens"]
    got = _session(path).run(["visual_tokens"], feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_opset_below_17_is_refused(tiny_model):
    with pytest.raises(ValueError, match="opset >= 17"):
        export_model_proto(tiny_model, opset=16)


def test_plain_variant_takes_pixel_values_only(tmp_path):
    model = build_model(preset("tiny", plain=True), seed=2)
    path = tmp_path / "plain.onnx"
    save_model(export_model_proto(model), path, "never")
    interface = graph_interface(check_graph(path))
    assert [i["name"] for i in interface["inputs"]] == ["pixel_values"]
    assert [o["name"] for o in interface["outputs"]] == ["visual_tokens"]


class TestFp16:
    @pytest.fixture(scope="class")
    def fp16_path(self, tmp_path_factory, tiny_model):
        path = tmp_path_factory.mktemp("fp16") / "vision.onnx"
        save_model(convert_to_fp16(export_model_proto(tiny_model)), path, "never")
        check_graph(path)
        return path

    def test_io_types(self, fp16_path):
        interface = graph_interface(onnx.load(str(fp16_path)))
        types = {s["name"]: s["dtype"] for s in interface["inputs"] + interface["outputs"]}
        assert types == {
            "pixel_values": "float16",
            "text_embeds": "float16",
            "text_mask": "int64",
            "visual_tokens": "float16",
            "lpwca_attention": "float32",  # the map's mean 1/(L*N) is below FP16's smallest normal at llava sizes
        }

    @pytest.mark.parametrize("lpwca", ["portable", "fused"])
    def test_the_map_is_fp32_from_its_softmax_to_the_output_with_ccra_in_fp16_too(self, tiny_model, lpwca):
        """--ccra-fp16: the module runs FP16, but the map's mean over heads and reshape (portable)
        stay FP32 after the FP32 softmax, and the fused node gives it FP32: one interface, no cast."""
        proto = convert_to_fp16(export_model_proto(tiny_model, lpwca=lpwca), keep_ccra_fp32=False)
        types = lpwca_schema.tensor_types(proto)
        assert types["lpwca_attention"] == onnx.TensorProto.FLOAT and types["visual_tokens"] == onnx.TensorProto.FLOAT16
        producers = {out: node for node in proto.graph.node for out in node.output}
        chain, name = [], "lpwca_attention"
        while producers[name].op_type not in ("Softmax", "LPWCA"):
            chain.append(producers[name].op_type)
            name = producers[name].input[0]
        assert chain == ([] if lpwca == "fused" else ["Reshape", "ReduceMean"])
        assert types[name] == onnx.TensorProto.FLOAT  # the softmax's (or node's) output, never rounded to FP16
        ccra_matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and in_scope(n, CCRA_SCOPE)]
        assert {types[n.output[0]] for n in ccra_matmuls} == {onnx.TensorProto.FLOAT16}  # the module did go FP16

    def test_softmax_and_ccra_compute_in_fp32_and_tower_in_fp16(self, fp16_path):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_path)))
        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
        types.update({t.name: t.data_type for t in model.graph.initializer})
        FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
        softmax_inputs = [types[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"]
        assert softmax_inputs and set(softmax_inputs) == {FLOAT}
        ccra_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and in_scope(n, CCRA_SCOPE)]
        tower_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and in_scope(n, "vision_tower")]
        assert ccra_matmuls and {types[n.input[0]] for n in ccra_matmuls} == {FLOAT}
        assert tower_matmuls and {types[n.input[1]] for n in tower_matmuls} == {FLOAT16}

    def test_accuracy_against_fp32_pytorch(self, tiny_model, fp16_path):
        feeds = random_inputs(tiny_model.config, batch=2, text_len=9, seed=4)
        want = reference_outputs(tiny_model, feeds)
        session = _session(fp16_path)
        half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
        got = dict(zip(["visual_tokens", "lpwca_attention"], session.run(None, half), strict=True))
        for name in want:
            result = compare_output(name, got[name], want[name], thresholds=_fp16())
            assert result.passed, result.failures
            assert result.cosine < 1.0 - 1e-9, "an FP16 graph that is bit-exact with FP32 was not converted"


def test_fused_op_gives_the_map_in_fp32_for_fp16_features_and_so_does_its_fake():
    """The kernels' contract (trt_plugins/lpwca/README.md): F in the features' type, A FP32 always;
    the fake (what the exporter traces) must agree with the eager body."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ccra_export.model.lpwca_fused import lpwca

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 3, 16, 8, generator=gen).half(), torch.randn(2, 3, 8, generator=gen))
    args += (torch.randn(2, 3, 2, generator=gen), 2, 1e-5, 0.5, 0.3)
    fused, attention = lpwca(*args)
    assert (fused.dtype, attention.dtype) == (torch.float16, torch.float32)
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(2))
    with FakeTensorMode() as mode:
        fake = torch.ops.ccra.lpwca(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert [t.dtype for t in fake] == [torch.float16, torch.float32]
    torch.library.opcheck(torch.ops.ccra.lpwca.default, args)


def _fp16():
    from ccra_export.core.parity import thresholds_for

    return thresholds_for("fp16")
