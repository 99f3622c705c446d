"""ONNX Runtime's TensorRT provider (``--backend ort-trt``) and session failures, without a GPU: a fused
graph is refused in one line before any session exists, and a session ONNX Runtime cannot create says
what ONNX Runtime said (only an unreadable file is called possibly truncated)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from ccra_export.cli.output import reports_errors
from ccra_export.core.errors import BackendUnavailableError, BundleError
from ccra_export.engine import ort_trt
from ccra_export.engine.plan import optimization_profiles
from ccra_export.runtime.ort_session import import_onnxruntime
from ccra_export.runtime.vision_backend import OrtBackend, create_session

INPUTS = [{"name": "features", "dtype": "float32", "shape": ["batch", 2, 3, 8]}]
AXES = {"batch": {"min": 1, "opt": 1, "max": 4}}


def fused_graph(path: Path) -> Path:
    """The smallest valid graph with a ccra::LPWCA node (2 heads, 2 layers, 3 patches, width 8)."""
    node = onnx.helper.make_node(
        "LPWCA",
        ["features", "query_weights", "query_bias"],
        ["fused", "attention"],
        domain="ccra",
        num_heads=2,
        epsilon=1e-5,
        head_scale=0.5,
        layer_scale=0.5,
        plugin_version="1",
        plugin_namespace="ccra",
    )
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node],
        "fused",
        [value("features", 1, [1, 2, 3, 8]), value("query_weights", 1, [1, 3, 8]), value("query_bias", 1, [1, 2, 2])],
        [value("fused", 1, [1, 3, 8]), value("attention", 1, [1, 2, 3])],
    )
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("ccra", 1)]
    onnx.save(onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10), str(path))
    return path


def test_the_fused_graph_runs_on_onnx_runtimes_cpu_provider(tmp_path):
    """The control: the same graph opens and runs where the CPU kernel serves the node."""
    backend = OrtBackend(fused_graph(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out = backend.run(
        {
            "features": rng.normal(size=(1, 2, 3, 8)),
            "query_weights": rng.normal(size=(1, 3, 8)),
            "query_bias": rng.normal(size=(1, 2, 2)),
        }
    )
    assert out["attention"].dtype == np.float32 and np.isclose(out["attention"].sum(), 1.0, atol=1e-5)


def test_a_fused_graph_on_the_tensorrt_provider_is_refused_before_any_session(tmp_path, monkeypatch):
    ort = import_onnxruntime()
    made = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: made.append(a) or pytest.fail("a session was made"))
    providers = ort_trt.providers(ort_trt.provider_options(tmp_path, "fp16", optimization_profiles(INPUTS, AXES)))
    with pytest.raises(BackendUnavailableError) as info:
        OrtBackend(fused_graph(tmp_path / "g.onnx"), providers=providers)
    assert "ccra::LPWCA node, which ONNX Runtime's TensorRT provider cannot run" in str(info.value)
    assert "IPluginV3" in str(info.value) and not made


def test_the_build_path_with_a_plugin_library_is_refused(tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"trt\.plugins nodes"):
        ort_trt.session_options(tmp_path, "fp16", optimization_profiles(INPUTS, AXES), tmp_path / "libccra.so")


def test_the_refusal_names_the_flags_in_the_cli(tmp_path):
    @click.command()
    @click.option("--backend")
    @reports_errors
    def verb(backend: str) -> None:
        ort_trt.refuse_fused({"plugin": {"node": "ccra::LPWCA"}}, tmp_path)  # type: ignore[arg-type]

    result = CliRunner().invoke(verb, ["--backend", "ort-trt"])
    assert result.exit_code == 2 and "run it with --backend trt and the plugin library" in result.output
    assert "--lpwca portable --backend ort-trt" in result.output  # the remedy: a portable graph for this provider
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_a_session_onnx_runtime_refuses_says_what_onnx_runtime_said(tmp_path):
    ort = import_onnxruntime()
    graph = onnx.load(str(fused_graph(tmp_path / "g.onnx")))  # no custom-op library registered: ORT refuses it
    with pytest.raises(BundleError) as info:
        create_session(graph.SerializeToString(), ort.SessionOptions(), ["CPUExecutionProvider"], path="g.onnx")
    message = str(info.value)
    assert message.startswith("g.onnx: ONNX Runtime could not create a session on CPUExecutionProvider (Fail: FAIL")
    assert "LPWCA" in message and "truncated" not in message and "\n" not in message


def test_an_unreadable_graph_is_still_called_possibly_truncated(tmp_path):
    ort = import_onnxruntime()
    data = (fused_graph(tmp_path / "g.onnx")).read_bytes()
    with pytest.raises(BundleError, match=r"INVALID_PROTOBUF.*may be truncated or changed"):
        create_session(b"\x08" + data[: len(data) // 3], ort.SessionOptions(), ["CPUExecutionProvider"], path="g")
