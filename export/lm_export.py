"""The LLaVA language model as a quantized ONNX decoder with KV cache, plus its embedding model.

onnxruntime-genai's model builder makes the decoder (INT4 MatMulNBits / INT8 / FP16 / FP32,
GroupQueryAttention, ``exclude_embeds``: it takes ``inputs_embeds``), because the visual tokens are
spliced in as embeddings. The token embedding lookup is a one-Gather ONNX graph over the same table.
The builder reads a Hugging Face causal-LM directory, so the LLaVA checkpoint's ``language_model``
tensors are copied under LlamaForCausalLM names first, byte for byte in 16 MiB chunks (a 7B LM is
never held in memory, nor instantiated in PyTorch).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors import safe_open

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


_COPY_CHUNK = 16 << 20


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, byte range) and where its data starts."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size)), 8 + size


def _write_streamed(sources: dict[str, tuple[Path, str]], out: Path) -> None:
    """Write ``{name: (file, name there)}`` as one safetensors file, copying each tensor's bytes in
    chunks: the peak memory is one chunk, whatever the model's size or dtype (bf16 included)."""
    headers = {file: _header(file) for file, _ in sources.values()}
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (file, source) in sources.items():
        meta = headers[file][0][source]
        begin, end = meta["data_offsets"]
        entries[name] = {"dtype": meta["dtype"], "shape": meta["shape"], "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format allows space padding; keeps the data 8-byte aligned
    with open(out, "wb") as target:
        target.write(len(header).to_bytes(8, "little") + header)
        for file, source in sources.values():
            _, data_start = headers[file]
            begin, end = headers[file][0][source]["data_offsets"]
            with open(file, "rb") as handle:
                handle.seek(data_start + begin)
                left = end - begin
                while left:
                    chunk = handle.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise CheckpointError(f"{file}: truncated: tensor {source} ends past the end of the file")
                    target.write(chunk)
                    left -= len(chunk)


def language_model_dir(checkpoint: Path, out: Path) -> Path:
    """Write a LlamaForCausalLM directory (config, weights, tokenizer) from a LLaVA checkpoint.

    The language model's tensors are renamed and copied byte for byte, one chunk at a time: a 7B
    model is never held in memory (nor instantiated in PyTorch)."""
    config = json.loads((checkpoint / "config.json").read_text())
    from transformers import LlavaConfig

    text = LlavaConfig.from_dict(config).text_config.to_dict()
    text["architectures"] = ["LlamaForCausalLM"]
    out.mkdir(parents=True, exist_ok=True)
    sources: dict[str, tuple[Path, str]] = {}
    for file in _weight_files(checkpoint):
        for name in _header(file)[0]:
            if (match := _LM_KEY.match(name)) is not None:
                rest = match["rest"]
                sources[rest if rest.startswith("lm_head") else f"model.{rest}"] = (file, name)
            elif _HEAD_KEY.match(name):
                sources["lm_head.weight"] = (file, name)
    if "lm_head.weight" not in sources and text.get("tie_word_embeddings") and "model.embed_tokens.weight" in sources:
        sources["lm_head.weight"] = sources["model.embed_tokens.weight"]
    if "model.embed_tokens.weight" not in sources or "lm_head.weight" not in sources:
        raise CheckpointError(f"{checkpoint}: no language_model.* / lm_head tensors: is this a full LLaVA checkpoint?")
    _write_streamed(sources, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(text, indent=2))
    copied = [name for name in TOKENIZER_FILES if (checkpoint / name).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise CheckpointError(f"{checkpoint}: no tokenizer (tokenizer.json): the runtime and the builder need it")
    for name in copied:
        shutil.copy(checkpoint / name, out / name)
    return out


LM_DEVICES = ("cpu", "cuda")


def build_decoder(lm_dir: Path, out: Path, precision: str, device: str = "cpu") -> None:
    """Run onnxruntime-genai's model builder for ``device`` (inputs_embeds in).

    ``cuda`` is the builder's CUDA target: FP16 activations, INT4/INT8 weights (MatMulNBits), the
    CUDA attention kernels and a genai_config naming the CUDA provider. It is written on any
    machine; ONNX Runtime's CPU provider also runs it, which is how a CPU workstation checks it.
    """
    if device not in LM_DEVICES:
        raise ValueError(f"--lm-device {device}: expected one of {', '.join(LM_DEVICES)}")
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
        device,
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
