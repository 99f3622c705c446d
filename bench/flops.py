"""Analytic FLOP counts (1 multiply-add = 2 FLOPs) of the vision graph, and a measured GEMM peak."""

from __future__ import annotations

import time

from ccra_export.core.config import ModelConfig


def tower_flops(config: ModelConfig) -> float:
    """CLIP ViT per image: patch conv + the encoder layers the graph runs (matmuls only)."""
    v = config.vision
    tokens, d = v.num_patches + 1, v.hidden_size
    conv = 2 * v.num_patches * (v.num_channels * v.patch_size**2) * d
    per_layer = 2 * tokens * d * d * 4 + 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * d * v.intermediate_size
    return conv + config.tower_layers_needed * per_layer


def ccra_flops(config: ModelConfig, text_len: int) -> float:
    """CCRA per image as the PyTorch reference computes it (keys materialised, unfolded)."""
    c = config.ccra
    if c is None:
        return 0.0
    n, dv, dt, da, layers = config.num_patches, config.vision.hidden_size, c.text_hidden_size, c.attn_dim, c.num_layers
    text = 2 * text_len * dt * 2 + 2 * dt * da
    lpwca = 2 * layers * n * dv * da + 2 * layers * n * da + layers * n * dv
    layer_wise = 2 * da * da + 2 * layers * n * dv * da + 2 * layers * n * da + 2 * layers * n * dv
    patch_wise = 2 * n * dv * da * 3 + 2 * n * n * da + 2 * n * dv * dv + 2 * n * n * dv
    return text + lpwca + layer_wise + patch_wise


def projector_flops(config: ModelConfig) -> float:
    n, dv, dlm = config.num_patches, config.vision.hidden_size, config.lm_hidden_size
    return 2 * n * dv * dlm + 2 * n * dlm * dlm


def vision_graph_flops(config: ModelConfig, batch: int, text_len: int) -> float:
    return batch * (tower_flops(config) + ccra_flops(config, text_len) + projector_flops(config))


def _gflops(run, size: int, seconds: float) -> float:
    run()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def measured_gemm_peak(size: int = 2048, seconds: float = 2.0) -> float:
    """FP32 GEMM GFLOP/s with torch (its BLAS: MKL on x86) on the current threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    return _gflops(lambda: torch.mm(a, b), size, seconds)


def measured_ort_gemm_peak(threads: int, size: int = 2048, seconds: float = 2.0) -> float:
    """FP32 GEMM GFLOP/s with ONNX Runtime's own MatMul (MLAS) on ``threads`` threads: the peak of
    the library a bundle's graph runs on. MKL and MLAS differ by up to 2x on the same cores (MKL
    runs at about half speed on AMD CPUs), so a graph's share of peak is against its own library."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((size, size), dtype=np.float32) for n in ("a", "b")}
    return _gflops(lambda: session.run(None, feeds), size, seconds)
