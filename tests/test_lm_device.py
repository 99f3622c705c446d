"""The language model built for the device it will run on: a CUDA decoder is built and checked on
this CPU-only machine, refused in one line where no CUDA provider exists, and run on a GPU by the
`gpu` tests."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline
from tests.bundles import build
from tests.test_generation import PROMPT

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory, ccra_checkpoint):
    return build(tmp_path_factory.mktemp("cuda") / "b", ccra_checkpoint, "int4", "--lm-device", "cuda")


def test_cuda_build_is_the_builders_cuda_target(cuda_bundle):
    manifest = json.loads((cuda_bundle / "manifest.json").read_text())
    assert manifest["language_model"]["device"] == "cuda"
    config = json.loads((cuda_bundle / "lm" / "decoder" / "genai_config.json").read_text())
    providers = config["model"]["decoder"]["session_options"]["provider_options"]
    assert any("cuda" in entry for entry in providers)
    graph = onnx.load(str(cuda_bundle / "lm" / "decoder" / "model.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert {"MatMulNBits", "GroupQueryAttention"} <= ops
    embeds = next(i for i in graph.input if i.name == "inputs_embeds")
    assert embeds.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # FP16 activations on CUDA
    embed_model = onnx.load(str(cuda_bundle / "lm" / "embed.onnx")).graph
    assert embed_model.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_cuda_decoder_has_parity_from_the_cpu_provider(cuda_bundle):
    report = json.loads((cuda_bundle / "parity.json").read_text())["language_model"]
    assert report["device"] == "cuda"
    assert report["ran_on"] == ("cuda" if HAS_CUDA_EP else "cpu")
    assert report["first_token_logits"]["cosine"] > 0.9  # INT4 weights, FP16 activations: the same model


@pytest.mark.skipif(HAS_CUDA_EP, reason="this ONNX Runtime has the CUDA provider: nothing to refuse")
def test_cuda_bundle_is_refused_in_one_line_without_the_cuda_provider(cuda_bundle, tmp_path, cat):
    cat.save(tmp_path / "cat.jpg")
    result = CliRunner().invoke(
        main, ["run", "--bundle", str(cuda_bundle), "--image", str(tmp_path / "cat.jpg"), "--prompt", PROMPT]
    )
    assert result.exit_code == 2
    assert "built for CUDA and this ONNX Runtime has no CUDAExecutionProvider" in result.stderr
    assert "--lm-device cpu" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(Exception, match="no CUDAExecutionProvider"):
        Pipeline.from_bundle(cuda_bundle)


def test_cuda_bundle_runs_on_the_cpu_provider_when_asked(cuda_bundle, cat):
    pipeline = Pipeline.from_bundle(cuda_bundle, lm_device="cpu")
    assert pipeline.lm.embeds_dtype == np.float16 and pipeline.lm.kv_dtype == np.float16
    reply = pipeline.chat().ask(PROMPT, cat, Sampling(max_new_tokens=6))
    assert len(reply.generation.tokens) == 6 and np.isfinite(reply.generation.first_logits).all()


def test_auto_device_is_cpu_without_a_gpu(fp32_bundle):
    if HAS_CUDA_EP:
        pytest.skip("this ONNX Runtime has the CUDA provider: auto picks cuda")
    bundle = fp32_bundle  # built with the default --lm-device auto
    assert json.loads((bundle / "manifest.json").read_text())["language_model"]["device"] == "cpu"
    doctor = json.loads(CliRunner().invoke(main, ["doctor", "--json"]).stdout)
    row = next(c for c in doctor if c["component"] == "Language model devices")
    assert row["detail"] == "cpu" and "onnxruntime-gpu" in row["fix"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_EP, reason="needs ONNX Runtime's CUDA provider (onnxruntime-gpu) and a GPU")
def test_cuda_decoder_generates_on_the_gpu(cuda_bundle, cat):
    on_gpu = Pipeline.from_bundle(cuda_bundle)
    assert on_gpu.lm.decoder.get_providers()[0] == "CUDAExecutionProvider"
    on_cpu = Pipeline.from_bundle(cuda_bundle, lm_device="cpu")
    gpu = on_gpu.chat().ask(PROMPT, cat, Sampling(max_new_tokens=16))
    cpu = on_cpu.chat().ask(PROMPT, cat, Sampling(max_new_tokens=16))
    cosine = float(
        np.dot(gpu.generation.first_logits, cpu.generation.first_logits)
        / (np.linalg.norm(gpu.generation.first_logits) * np.linalg.norm(cpu.generation.first_logits))
    )
    assert cosine > 0.999
    print(f"GPU decode {15 / gpu.generation.decode_s:.1f} tokens/s, CPU {15 / cpu.generation.decode_s:.1f}")


def _batched_vs_solo(bundle, device: str) -> None:
    """Three prompts of different lengths through a 3-slot pool on ``device``, every step's
    logits against the solo run's (FP16 decoder: within FP16 rounding). The tokens fed are forced
    to the same ones, so a near-tie on this random model cannot send the two runs apart."""
    from dataclasses import dataclass, field

    from ccra_export.runtime.batching import ContinuousBatcher
    from ccra_export.runtime.language_model import KVPool, LanguageModel, Sampling

    @dataclass
    class Forced(Sampling):
        feed: list[int] = field(default_factory=list)
        seen: list[np.ndarray] = field(default_factory=list)

        def choose(self, logits, rng):
            self.seen.append(np.array(logits))
            return self.feed[len(self.seen) - 1]

    lm = LanguageModel(bundle / "lm", device)
    rng = np.random.default_rng(3)
    prompts = [lm.embed(rng.integers(3, 100, n).tolist()) for n in (4, 13, 7)]
    feeds = [rng.integers(3, 100, 6).tolist() for _ in prompts]
    solo = [Forced(max_new_tokens=6, feed=f) for f in feeds]
    for prompt, sampling in zip(prompts, solo, strict=True):
        lm.generate(prompt, sampling)
    together = [Forced(max_new_tokens=6, feed=f) for f in feeds]
    batcher = ContinuousBatcher(lm, KVPool(lm, 3))
    try:
        with batcher._wake:  # all three queued before the loop looks: they are decoded together
            futures = [batcher.submit(batcher.pool.acquire(), p, f) for p, f in zip(prompts, together, strict=True)]
        for future in futures:
            future.result(120)
    finally:
        batcher.close()
    assert batcher.batched_tokens > batcher.steps
    for alone, batched in zip(solo, together, strict=True):
        assert len(batched.seen) == len(alone.seen) == 6
        for ours, theirs in zip(batched.seen, alone.seen, strict=True):
            np.testing.assert_allclose(ours, theirs, atol=2e-2, rtol=0)


def test_the_cuda_decoder_batches_on_the_cpu_provider(cuda_bundle):
    """The CUDA target's FP16 KV buffers bound by address, run by the CPU provider."""
    _batched_vs_solo(cuda_bundle, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_EP, reason="this ONNX Runtime has no CUDAExecutionProvider (onnxruntime-gpu)")
def test_the_cuda_decoder_batches_on_the_gpu(cuda_bundle):
    """The KV pool in device memory, rows bound by address: batched decode on the GPU."""
    _batched_vs_solo(cuda_bundle, "cuda")
