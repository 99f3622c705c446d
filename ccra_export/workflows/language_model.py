"""The language-model part of `ccra-export build --lm-precision`: export into the bundle, parity.

Parity compares our ONNX decoder with Hugging Face's LlamaForCausalLM on the same input
embeddings (rows of the real embedding table): greedy tokens for 32 steps with end-of-sequence
disabled on both sides, first-token logits (cosine, max abs error), and, teacher-forced on
Hugging Face's tokens, the next-token KL divergence, top-1 agreement and Δp at each of them. The
teacher-forced figures are bounded at every precision (core/lm_quality.DEFAULT_BOUNDS); FP32
must also reproduce every greedy token (quantization legitimately changes a free-running
continuation, which is why the bounded figures are teacher-forced).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import ConfigError
from ccra_export.core.parity import LanguageModelReport
from ccra_export.export.lm_export import (
    LM_DEVICES,
    LMQuant,
    build_decoder,
    build_embedding_model,
    language_model_dir,
    matmul_widths,
)
from ccra_export.runtime import lm_parity
from ccra_export.runtime.language_model import LanguageModel
from ccra_export.runtime.vision_backend import available_providers

PARITY_STEPS = 32
PROMPT_TOKENS = 24


def resolve_device(device: str, vision_backend: str) -> tuple[str, str]:
    """``--lm-device`` -> ``cpu`` | ``cuda`` and why: auto follows the vision backend's device."""
    if device not in ("auto", *LM_DEVICES):
        raise ConfigError(f"expected auto, {', '.join(LM_DEVICES)}", field="lm_device", value=device)
    if device != "auto":
        return device, f"lm_device {device}"
    if vision_backend in ("trt", "ort-trt"):
        return "cuda", f"auto: the vision graph runs on the GPU ({vision_backend})"
    if "CUDAExecutionProvider" in available_providers():
        return "cuda", "auto: ONNX Runtime has the CUDA provider here"
    return "cpu", "auto: no GPU provider here"


#: the builder's decoders whose past and present KV share one buffer (GroupQueryAttention), which the
#: runtime's in-place KV cache binds: FP32 activations on the CPU, FP16 on CUDA. The others get plain
#: attention with a growing cache (onnxruntime-genai's builder, checked here: a CPU FP16 decoder's
#: present KV grows past the bound buffer).
SHARED_KV_PRECISIONS = {"cpu": ("int4", "int8", "fp32"), "cuda": ("int4", "int8", "fp16")}


def check_kv_binding(precision: str, device: str) -> None:
    """Refuse, before anything is exported, a decoder the runtime could not run."""
    supported = SHARED_KV_PRECISIONS.get(device, ())
    if precision not in supported:
        raise ConfigError(
            f"not for a {device.upper()} decoder: the model builder writes it without a shared KV buffer "
            f"(plain attention, a growing cache), which the runtime's in-place KV cache cannot run; "
            f"on {device.upper()} take one of {', '.join(supported)}",
            field="lm_precision",
            value=precision,
        )


def _decoder_input_dtype(decoder_dir: Path) -> np.dtype:
    """The decoder's ``inputs_embeds`` type (FP16 for CUDA builds): the embedding model writes it."""
    model = onnx.load(str(decoder_dir / "model.onnx"), load_external_data=False)
    elem = next(i.type.tensor_type.elem_type for i in model.graph.input if i.name == "inputs_embeds")
    return np.dtype(np.float16) if elem == onnx.TensorProto.FLOAT16 else np.dtype(np.float32)


@dataclass(frozen=True)
class ExportedLanguageModel:
    """What ``export_into`` wrote (the manifest's ``language_model`` without its parity) and the
    Hugging Face language model it extracted (scratch), which parity compares with."""

    precision: str
    device: str
    image_token_id: int
    template: str
    files: list[str]
    hf_dir: Path
    quant: LMQuant | None  #: INT4/INT8: the recipe the builder ran (``auto`` resolved)


def export_into(
    checkpoint: Path,
    stage: Path,
    scratch: Path,
    precision: str,
    device: str = "cpu",
    steps: Steps = SILENT,
    quant: LMQuant | None = None,
) -> ExportedLanguageModel:
    """Write ``stage/lm`` (decoder + embedding model + tokenizer)."""
    from transformers import LlavaConfig

    with steps.step("Extracting the language model from the LLaVA checkpoint"):
        hf_dir = language_model_dir(checkpoint, scratch / "lm-hf")
    with steps.step(f"Building the {precision} decoder for {device.upper()} (onnxruntime-genai model builder)"):
        build_decoder(hf_dir, stage / "lm" / "decoder", precision, device, quant)
        build_embedding_model(hf_dir, stage / "lm" / "embed.onnx", _decoder_input_dtype(stage / "lm" / "decoder"))
    # model/checkpoint_check.py found the tokenizer's <image> equal to config.json's before any export
    image_id = LlavaConfig.from_dict(json.loads((checkpoint / "config.json").read_text())).image_token_index
    files = sorted(str(p.relative_to(stage)) for p in (stage / "lm").rglob("*") if p.is_file())
    resolved = (
        (quant or LMQuant()).resolved(precision, matmul_widths(hf_dir)) if precision in ("int4", "int8") else None
    )
    return ExportedLanguageModel(precision, device, image_id, "llava-1.5 (vicuna_v1)", files, hf_dir, resolved)


def parity(
    hf_dir: Path, lm_dir: Path, precision: str, device: str = "cpu", steps: Steps = SILENT
) -> LanguageModelReport:
    """Our decoder against transformers. It runs on ``device`` where this machine has its provider,
    else on the CPU provider (a CUDA decoder built on a CPU workstation is checked there). The
    prompt and Hugging Face's answer go into ``lm/reference.npz`` so `check` can rerun it."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    with steps.step(f"Language model parity vs Hugging Face ({PARITY_STEPS} greedy tokens)"):
        hf_logging.disable_progress_bar()  # our step line is the progress; keep the terminal clean
        reference = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        table = reference.model.embed_tokens.weight.detach()
        ids = torch.from_numpy(np.random.default_rng(0).integers(0, table.shape[0], PROMPT_TOKENS))
        embeds = table[ids][None]
        reference.generation_config.eos_token_id = None  # both sides run all PARITY_STEPS steps
        with torch.no_grad():
            want_logits = reference(inputs_embeds=embeds).logits[0, -1].numpy()
            want = reference.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(1, PROMPT_TOKENS, dtype=torch.long),
                max_new_tokens=PARITY_STEPS,
                do_sample=False,
                pad_token_id=0,
            )[0, -PARITY_STEPS:].tolist()
            # teacher forcing: its own answer fed, the next-token logits at each answer position
            fed = torch.cat([embeds, table[torch.tensor(want[:-1])][None]], dim=1)
            forced = reference(inputs_embeds=fed).logits[0, -PARITY_STEPS:].numpy()
        lm_parity.save_reference(lm_dir.parent / lm_parity.LM_REFERENCE_FILE, ids.numpy(), want_logits, want, forced)
        ran_on = lm_parity.runnable_device(device)
        measured = lm_parity.figures(LanguageModel(lm_dir, ran_on), lm_dir.parent / lm_parity.LM_REFERENCE_FILE)
    report: LanguageModelReport = {
        "reference": "transformers LlamaForCausalLM, FP32",
        "precision": precision,
        "device": device,
        "ran_on": ran_on,
        **measured,
    }
    return report
