"""The language-model part of `ccra-export build --lm-precision`: export into the bundle, parity.

Parity compares our ONNX decoder with Hugging Face's LlamaForCausalLM on the same input
embeddings (rows of the real embedding table): greedy tokens for 32 steps with end-of-sequence
disabled on both sides, first-token logits (cosine, max abs error), and, teacher-forced on
Hugging Face's tokens, the next-token KL divergence, top-1 agreement and Δp at each of them. The
teacher-forced figures are bounded at every precision (core/lm_quality.DEFAULT_BOUNDS); FP32
must also reproduce every greedy token (quantization legitimately changes a free-running
continuation, which is why the bounded figures are teacher-forced).

The decoder's own options (export/lm_export.DecoderOptions): the context it serves, its LM head
pruned to the last position, and an INT8 KV cache, calibrated here on the same decoder built with
an unquantized one and bounded against it (core/lm_quality.KV_INT8_BOUNDS) as well as against
Hugging Face (the weights' bounds plus the cache's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from ccra_export.calibration import kv_scales
from ccra_export.calibration.images import DEFAULT_PROMPTS
from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import ConfigError
from ccra_export.core.genai_config import GENAI_CONFIG, read_genai_config
from ccra_export.core.lm_quality import KV_INT8_BOUNDS, NextTokenFigures, violations
from ccra_export.core.manifest_schema import DecoderRecord
from ccra_export.core.parity import LanguageModelReport
from ccra_export.demo import CHECKPOINT as DEMO_CHECKPOINT
from ccra_export.demo import DEMO
from ccra_export.export.lm_export import (
    LM_DEVICES,
    DecoderOptions,
    LMQuant,
    build_decoder,
    build_embedding_model,
    checkpoint_matmul_widths,
    language_model_dir,
    matmul_widths,
    max_context,
)
from ccra_export.runtime import lm_parity
from ccra_export.runtime.language_model import LanguageModel, Sampling
from ccra_export.runtime.vision_backend import available_providers

PARITY_STEPS = 32
PROMPT_TOKENS = 24
#: INT8 KV calibration: the greedy tokens the unquantized-KV decoder adds to each template prompt
CALIBRATION_ANSWER_TOKENS = 16


def parity_lengths(context: int) -> tuple[int, int]:
    """The parity prompt's tokens and greedy steps for a decoder of ``context`` tokens: 24 and 32,
    or as many as fit a smaller context (the prompt and every step but the last are fed)."""
    if PROMPT_TOKENS + PARITY_STEPS - 1 <= context:
        return PROMPT_TOKENS, PARITY_STEPS
    prompt = max(1, min(PROMPT_TOKENS, (context + 1) // 2))
    return prompt, min(PARITY_STEPS, context - prompt + 1)


def _checkpoint_dir(model: str) -> Path | None:
    """The checkpoint directory ``--model`` names (the demo's own), None for a preset or a missing one."""
    path = DEMO_CHECKPOINT if model == DEMO else Path(model)
    return path if (path / "config.json").is_file() else None


def check_decoder(
    model: str,
    lm_precision: str | None,
    lm_device: str,
    vision_backend: str,
    decoder: DecoderOptions,
    quant: LMQuant | None = None,
) -> None:
    """Refuse, before anything loads, decoder options the build cannot honour: a context above the
    model's own (its max_position_embeddings), a k-quant recipe its MatMul widths cannot take at the
    block size, options given without a language model."""
    if not lm_precision:
        for name, given in (("context", decoder.context is not None), ("kv_cache", decoder.kv_cache != "fp")):
            if given:
                raise ConfigError(
                    "applies to the language model; add {lm_precision}", field=name, mentions=("lm_precision",)
                )
        return
    checkpoint = _checkpoint_dir(model)
    if decoder.context is not None and checkpoint is not None:
        try:
            limit = max_context(checkpoint)
        except (OSError, ValueError, TypeError, KeyError):
            return  # an unreadable config.json: the checkpoint check names what is wrong with it
        if decoder.context > limit:
            raise ConfigError(
                f"above the model's own context of {limit} tokens (its max_position_embeddings); expected 1..{limit}",
                field="context",
                value=decoder.context,
            )
    if quant is not None and lm_precision in ("int4", "int8") and checkpoint is not None:
        try:
            widths = checkpoint_matmul_widths(checkpoint)
        except (OSError, ValueError, TypeError, KeyError):
            widths = None  # as above: the checkpoint check reports it
        quant.resolved(lm_precision, widths)
    device, _ = resolve_device(lm_device, vision_backend)
    if decoder.kv_cache == "int8" and device != "cpu":
        raise ConfigError(
            "an INT8 KV cache is built for the CPU decoder only: the CUDA decoder's is not checked here",
            field="kv_cache",
            value=decoder.kv_cache,
        )


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
    decoder: DecoderRecord | None = None  #: context, LM head, KV cache (the manifest's ``decoder``)
    #: bounds the INT8 KV cache broke against the same decoder with an unquantized one
    failures: list[str] = field(default_factory=list)


def write_language_model(
    hf_dir: Path,
    out: Path,
    precision: str,
    device: str,
    quant: LMQuant | None,
    decoder: DecoderOptions,
    kv_scale_file: Path | None = None,
) -> None:
    """A decoder and its embedding model into ``out`` (``out/decoder``, ``out/embed.onnx``)."""
    build_decoder(hf_dir, out / "decoder", precision, device, quant, decoder, kv_scale_file)
    build_embedding_model(hf_dir, out / "embed.onnx", _decoder_input_dtype(out / "decoder"))


def export_into(
    checkpoint: Path,
    stage: Path,
    scratch: Path,
    precision: str,
    device: str = "cpu",
    steps: Steps = SILENT,
    quant: LMQuant | None = None,
    decoder: DecoderOptions | None = None,
) -> ExportedLanguageModel:
    """Write ``stage/lm`` (decoder + embedding model + tokenizer). An INT8 KV cache is calibrated on
    the same decoder built first with an unquantized cache (in ``scratch``), then measured against it."""
    from transformers import LlavaConfig

    decoder = decoder or DecoderOptions()
    with steps.step("Extracting the language model from the LLaVA checkpoint"):
        hf_dir = language_model_dir(checkpoint, scratch / "lm-hf")
    scales, baseline = None, scratch / "lm-fp-kv"
    if decoder.kv_cache == "int8":
        with steps.step(f"Building the {precision} decoder with an unquantized KV cache (INT8 KV calibration)"):
            write_language_model(hf_dir, baseline, precision, device, quant, replace(decoder, kv_cache="fp"))
        with steps.step("Calibrating the INT8 KV cache's scales on the parity and template prompts"):
            reference = LanguageModel(baseline, lm_parity.runnable_device(device))
            ranges = kv_scales.kv_ranges(reference, calibration_prompts(reference, hf_dir))
            scales = kv_scales.write_scales(ranges, decoder.kv_scheme, stage / "lm" / kv_scales.SCALES_FILE)
    title = f"Building the {precision} decoder for {device.upper()}"
    if decoder.kv_cache == "int8":
        title += f", {decoder.kv_scheme} KV cache"
    with steps.step(f"{title} (onnxruntime-genai model builder)"):
        write_language_model(hf_dir, stage / "lm", precision, device, quant, decoder, scales)
    record, failures = _decoder_record(checkpoint, stage, decoder, scales), []
    if scales is not None:
        with steps.step("INT8 KV cache vs the unquantized one (teacher-forced on its own answer)"):
            figures = kv_figures(reference, LanguageModel(stage / "lm", lm_parity.runnable_device(device)), hf_dir)
        record["kv_figures"] = figures.as_dict()
        failures = [f"language model, INT8 KV cache: {v}" for v in violations(figures, None, KV_INT8_BOUNDS)]
    # model/checkpoint_check.py found the tokenizer's <image> equal to config.json's before any export
    image_id = LlavaConfig.from_dict(json.loads((checkpoint / "config.json").read_text())).image_token_index
    files = sorted(str(p.relative_to(stage)) for p in (stage / "lm").rglob("*") if p.is_file())
    resolved = (
        (quant or LMQuant()).resolved(precision, matmul_widths(hf_dir)) if precision in ("int4", "int8") else None
    )
    return ExportedLanguageModel(
        precision, device, image_id, "llava-1.5 (vicuna_v1)", files, hf_dir, resolved, record, failures
    )


def _decoder_record(checkpoint: Path, stage: Path, decoder: DecoderOptions, scales: Path | None) -> DecoderRecord:
    """The manifest's ``language_model.decoder``, from the genai_config the runtime will read."""
    config = read_genai_config(stage / "lm" / "decoder" / GENAI_CONFIG)
    shape = config["decoder"]
    model = onnx.load(str(stage / "lm" / "decoder" / shape["filename"]), load_external_data=False)
    elem = next(i.type.tensor_type.elem_type for i in model.graph.input if i.name.startswith("past_key_values."))
    size = onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize
    record = DecoderRecord(
        context_length=config["context_length"],
        model_context=max_context(checkpoint),
        prune_lm_head=decoder.prune_lm_head,
        kv_cache="int8" if decoder.kv_cache == "int8" else "fp",
        kv_bytes_per_token=2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_size"] * size,
    )
    if scales is not None:
        record["kv_scheme"] = decoder.kv_scheme  # type: ignore[typeddict-item]  # KV_SCHEMES: the schema's
        record["kv_scales"] = str(scales.relative_to(stage))
    return record


def calibration_prompts(lm: LanguageModel, hf_dir: Path) -> list[np.ndarray]:
    """What INT8 KV scales are calibrated on: the language-model parity's prompt (rows of the
    embedding table) followed by the decoder's own greedy answer, and LLaVA's template around each
    default calibration instruction followed by its answer; [1, S, D] embeddings, each within the
    decoder's context."""
    from tokenizers import Tokenizer

    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    prompt_tokens, steps = parity_lengths(lm.context_length)
    prompts = [np.random.default_rng(0).integers(0, vocab, prompt_tokens)]
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for instruction in DEFAULT_PROMPTS:
        ids = tokenizer.encode(f"USER: {instruction} ASSISTANT:").ids
        prompts.append(np.asarray([i for i in ids if i < vocab], np.int64)[: lm.context_length])
    fed = []
    for index, ids in enumerate(prompts):
        budget = steps if index == 0 else CALIBRATION_ANSWER_TOKENS
        budget = min(budget, lm.context_length - len(ids) + 1)
        embeds = lm.embed(ids)
        if budget >= 2:
            answer = lm.generate(embeds, Sampling(max_new_tokens=budget)).tokens
            embeds = np.concatenate([embeds, lm.embed(answer[:-1])], axis=1)
        fed.append(embeds)
    return fed


def kv_figures(reference: LanguageModel, quantized: LanguageModel, hf_dir: Path) -> NextTokenFigures:
    """The INT8 KV cache's own cost: the quantized decoder against the same decoder with an
    unquantized cache, teacher-forced on the reference's greedy answer to the parity prompt."""
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    prompt_tokens, steps = parity_lengths(reference.context_length)
    prompt = reference.embed(np.random.default_rng(0).integers(0, vocab, prompt_tokens))
    answer = reference.generate(prompt, Sampling(max_new_tokens=steps)).tokens
    return lm_parity.teacher_forced(quantized, prompt, answer, reference.answer_logits(prompt, answer))


def parity(
    hf_dir: Path, lm_dir: Path, precision: str, device: str = "cpu", steps: Steps = SILENT
) -> LanguageModelReport:
    """Our decoder against transformers. It runs on ``device`` where this machine has its provider,
    else on the CPU provider (a CUDA decoder built on a CPU workstation is checked there). The
    prompt and Hugging Face's answer go into ``lm/reference.npz`` so `check` can rerun it. A decoder
    built for a context below 24 + 32 tokens gets a prompt and an answer that fit it."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    prompt_tokens, parity_steps = parity_lengths(read_genai_config(lm_dir / "decoder" / GENAI_CONFIG)["context_length"])
    with steps.step(f"Language model parity vs Hugging Face ({parity_steps} greedy tokens)"):
        hf_logging.disable_progress_bar()  # our step line is the progress; keep the terminal clean
        reference = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        table = reference.model.embed_tokens.weight.detach()
        ids = torch.from_numpy(np.random.default_rng(0).integers(0, table.shape[0], prompt_tokens))
        embeds = table[ids][None]
        reference.generation_config.eos_token_id = None  # both sides run all parity_steps steps
        with torch.no_grad():
            want_logits = reference(inputs_embeds=embeds).logits[0, -1].numpy()
            want = reference.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(1, prompt_tokens, dtype=torch.long),
                max_new_tokens=parity_steps,
                do_sample=False,
                pad_token_id=0,
            )[0, -parity_steps:].tolist()
            # teacher forcing: its own answer fed, the next-token logits at each answer position
            fed = torch.cat([embeds, table[torch.tensor(want[:-1], dtype=torch.long)][None]], dim=1)
            forced = reference(inputs_embeds=fed).logits[0, -parity_steps:].numpy()
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
