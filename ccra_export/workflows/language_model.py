"""The language-model part of `ccra-export build --lm-precision`: export into the bundle, parity.

Parity compares our ONNX decoder with Hugging Face's LlamaForCausalLM on the same input
embeddings (rows of the real embedding table): first-token logits (cosine, max abs error) and
greedy tokens for 32 steps with end-of-sequence disabled on both sides. FP32 must reproduce every
token; FP16/INT8/INT4 are reported (quantization legitimately changes tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import ConfigError
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.export.lm_export import build_decoder, build_embedding_model, language_model_dir
from ccra_export.runtime.language_model import LanguageModel, Sampling

PARITY_STEPS = 32
PROMPT_TOKENS = 24


def export_into(checkpoint: Path, stage: Path, scratch: Path, precision: str, steps: Steps = SILENT) -> dict[str, Any]:
    """Write ``stage/lm`` (decoder + embedding model + tokenizer); returns the manifest record."""
    from transformers import LlavaConfig

    with steps.step("Extracting the language model from the LLaVA checkpoint"):
        hf_dir = language_model_dir(checkpoint, scratch / "lm-hf")
    with steps.step(f"Building the {precision} decoder (onnxruntime-genai model builder)"):
        build_decoder(hf_dir, stage / "lm" / "decoder", precision)
        build_embedding_model(hf_dir, stage / "lm" / "embed.onnx", np.float16 if precision == "fp16" else np.float32)
    config = LlavaConfig.from_dict(json.loads((checkpoint / "config.json").read_text()))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(stage / "lm" / "decoder" / "tokenizer.json"))
    image_id = tokenizer.token_to_id("<image>")
    if image_id is None or image_id != config.image_token_index:
        raise ConfigError(
            f"{checkpoint}/tokenizer.json: <image> is token {image_id}, config.json image_token_index is "
            f"{config.image_token_index}; they must agree"
        )
    files = sorted(str(p.relative_to(stage)) for p in (stage / "lm").rglob("*") if p.is_file())
    return {
        "precision": precision,
        "image_token_id": image_id,
        "template": "llava-1.5 (vicuna_v1)",
        "files": files,
        "hf_dir": str(hf_dir),
    }


def parity(hf_dir: Path, lm_dir: Path, steps: Steps = SILENT) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    with steps.step(f"Language model parity vs Hugging Face ({PARITY_STEPS} greedy tokens)"):
        hf_logging.disable_progress_bar()  # our step line is the progress; keep the terminal clean
        reference = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        ours = LanguageModel(lm_dir)
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
        got = ours.generate(embeds.numpy(), Sampling(max_new_tokens=PARITY_STEPS))
    logits = compare_output("first_token_logits", got.first_logits, want_logits, thresholds_for("fp32"))
    agree = sum(a == b for a, b in zip(got.tokens, want, strict=False))
    prefix = next((i for i, (a, b) in enumerate(zip(got.tokens, want, strict=False)) if a != b), len(want))
    return {
        "reference": "transformers LlamaForCausalLM, FP32",
        "first_token_logits": {"cosine": logits.cosine, "max_abs_err": logits.max_abs_err},
        "greedy_steps": PARITY_STEPS,
        "tokens_agreeing": agree,
        "identical_prefix": prefix,
        "tokens": got.tokens,
        "reference_tokens": want,
    }
