"""The LLaVA language model as a quantized ONNX decoder with KV cache, plus its embedding model.

onnxruntime-genai's model builder makes the decoder (INT4 MatMulNBits / INT8 / FP16 / FP32,
GroupQueryAttention, ``exclude_embeds``: it takes ``inputs_embeds``), because the visual tokens are
spliced in as embeddings. The token embedding lookup is a one-Gather ONNX graph over the same table.
The builder reads a Hugging Face causal-LM directory, so the LLaVA checkpoint's ``language_model``
tensors are re-saved under LlamaForCausalLM names first, one tensor at a time (a 7B LM is never
instantiated in PyTorch).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors import safe_open
from safetensors.numpy import save_file

from ccra_export.core.errors import CheckpointError

LM_PRECISIONS = ("int4", "int8", "fp16", "fp32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# LLaVA's language-model tensors under every published prefix -> LlamaForCausalLM names
_LM_KEY = re.compile(r"^(?:model\.)?language_model\.(?:model\.)?(?P<rest>.+)$")
_HEAD_KEY = re.compile(r"^(?:language_model\.)?lm_head\.weight$")


def _weight_files(checkpoint: Path) -> list[Path]:
    files = sorted(p for p in checkpoint.glob("*.safetensors") if p.name != "ccra.safetensors")
    if not files:
        raise CheckpointError(f"{checkpoint}: no *.safetensors weights for the language model")
    return files


def language_model_dir(checkpoint: Path, out: Path) -> Path:
    """Write a LlamaForCausalLM directory (config, weights, tokenizer) from a LLaVA checkpoint."""
    config = json.loads((checkpoint / "config.json").read_text())
    from transformers import LlavaConfig

    text = LlavaConfig.from_dict(config).text_config.to_dict()
    text["architectures"] = ["LlamaForCausalLM"]
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(checkpoint):
        with safe_open(str(file), "np") as handle:
            for name in handle.keys():
                if (match := _LM_KEY.match(name)) is not None:
                    rest = match["rest"]
                    tensors[rest if rest.startswith("lm_head") else f"model.{rest}"] = handle.get_tensor(name)
                elif _HEAD_KEY.match(name):
                    tensors["lm_head.weight"] = handle.get_tensor(name)
    if "lm_head.weight" not in tensors and text.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    if "model.embed_tokens.weight" not in tensors or "lm_head.weight" not in tensors:
        raise CheckpointError(f"{checkpoint}: no language_model.* / lm_head tensors: is this a full LLaVA checkpoint?")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(text, indent=2))
    copied = [name for name in TOKENIZER_FILES if (checkpoint / name).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise CheckpointError(f"{checkpoint}: no tokenizer (tokenizer.json): the runtime and the builder need it")
    for name in copied:
        shutil.copy(checkpoint / name, out / name)
    return out


def build_decoder(lm_dir: Path, out: Path, precision: str) -> None:
    """Run onnxruntime-genai's model builder (CPU execution provider, inputs_embeds in)."""
    if precision not in LM_PRECISIONS:
        raise ValueError(f"--lm-precision {precision}: expected one of {', '.join(LM_PRECISIONS)}")
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise CheckpointError("--lm-precision needs onnxruntime-genai's model builder: pip install 'ccra-export[lm]'")
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(lm_dir),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "--extra_options",
        "exclude_embeds=true",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise CheckpointError(f"onnxruntime-genai model builder failed: {lines[-1] if lines else 'no output'}")


def build_embedding_model(lm_dir: Path, out: Path, dtype: np.dtype) -> None:
    """``input_ids [B, S] int64 -> inputs_embeds [B, S, D]``: one Gather over the LM's table."""
    with safe_open(str(lm_dir / "model.safetensors"), "np") as handle:
        table = handle.get_tensor("model.embed_tokens.weight").astype(dtype)
    elem = TensorProto.FLOAT16 if table.dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens", "input_ids"], ["inputs_embeds"], axis=0)],
        "embed_tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "sequence", table.shape[1]])],
        [numpy_helper.from_array(table, "embed_tokens")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    large = table.nbytes > (1 << 30)
    onnx.save_model(model, str(out), save_as_external_data=large, location=f"{out.name}.data" if large else None)
