"""The LLaVA language model as a quantized ONNX decoder with KV cache, plus its embedding model.

onnxruntime-genai's model builder makes the decoder (INT4 MatMulNBits / INT8 / FP16 / FP32,
GroupQueryAttention, ``exclude_embeds``: it takes ``inputs_embeds``), because the visual tokens are
spliced in as embeddings. The token embedding lookup is a one-Gather ONNX graph over the same table.
The builder reads a Hugging Face causal-LM directory, so the LLaVA checkpoint's ``language_model``
tensors are copied under LlamaForCausalLM names first, byte for byte in 16 MiB chunks (a 7B LM is
never held in memory, nor instantiated in PyTorch).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ccra_export.core.errors import CheckpointError, ConfigError
from ccra_export.core.extras import require

LM_PRECISIONS = ("int4", "int8", "fp16", "fp32")
#: the model builder's weight-only recipes (its algo_config): rtn, round to nearest; k_quant,
#: llama.cpp's k-quant search; k_quant_mixed, k_quant with the LM head and the most sensitive
#: MatMuls (llama.cpp's mixed strategy) in INT8
LM_QUANT_RECIPES = ("default", "rtn", "k_quant", "k_quant_mixed")
#: ``--lm-quant auto``: per precision, the recipe the measurements chose (docs/language-model.md):
#: INT4 k_quant_mixed (the demo's KL 6x lower than the others, top-1 kept; on a 0.5B model +22%
#: bytes), INT8 the builder's default (k_quant does not help at 8 bits)
AUTO_RECIPE = {"int4": "k_quant_mixed", "int8": "default"}
LM_BLOCK_SIZES = (16, 32, 64, 128, 256)


def _text_config(checkpoint: Path) -> dict[str, Any]:
    """The language model's config (LLaVA's ``text_config``, defaults filled) from a checkpoint's
    config.json: a json read, nothing loaded."""
    from transformers import LlavaConfig

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return LlavaConfig.from_dict(config).text_config.to_dict()


class MatMulWidths(NamedTuple):
    """A Llama decoder's MatMul widths: the inputs the builder's quantizer blocks along (``hidden``:
    q/k/v, gate/up and the LM head; ``intermediate``: down; ``attention``, heads x head size: the
    attention output) and the KV projections' outputs (``kv``)."""

    hidden: int
    intermediate: int
    kv: int
    attention: int

    @classmethod
    def of_text_config(cls, config: dict[str, Any]) -> MatMulWidths:
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        kv = config.get("num_key_value_heads") or heads
        return cls(config["hidden_size"], config["intermediate_size"], kv * head_dim, heads * head_dim)

    def odd_block_counts(self, block_size: int) -> list[int]:
        """The input widths that ``block_size`` splits into an odd number of blocks."""
        inputs = (self.hidden, self.intermediate, self.attention)
        return sorted({width for width in inputs if -(-width // block_size) % 2})

    def k_quant_refusal(self, block_size: int, bits: int = 4) -> str | None:
        """Why the builder's k-quant pass cannot quantize these MatMuls at ``block_size``, or None.
        At 4 bits it packs a whole matrix's zero points two per byte, then splits them by column: a
        column of an odd number of blocks fails there (onnxruntime
        quantization/neural_compressor/weight_only.py, make_matmul_weight_only_node; 8-bit zero points
        take a byte each). Conservative for a one-layer k_quant_mixed model, whose down projections
        are all 8-bit."""
        odd = self.odd_block_counts(block_size) if bits == 4 else []
        if not odd:
            return None
        fitting = [size for size in LM_BLOCK_SIZES if not self.odd_block_counts(size)]
        below = [size for size in fitting if size < block_size]  # the nearest smaller block first
        choice = below[-1] if below else next(iter(fitting), None)
        remedy = f"{{lm_block_size}} {choice} fits" if choice else "no block size fits; rtn or default does"
        return (
            f"k-quant at {block_size}-wide blocks needs an even number of blocks per column; "
            f"{', '.join(map(str, odd))} gives an odd one ({remedy})"
        )


def matmul_widths(lm_dir: Path) -> MatMulWidths:
    """The MatMul widths of a Llama decoder directory (its config.json)."""
    return MatMulWidths.of_text_config(json.loads((Path(lm_dir) / "config.json").read_text()))


def checkpoint_matmul_widths(checkpoint: Path) -> MatMulWidths:
    """The language model's MatMul widths from a LLaVA checkpoint's config.json."""
    return MatMulWidths.of_text_config(_text_config(checkpoint))


@dataclass(frozen=True)
class LMQuant:
    """How INT4/INT8 weights are made (MatMulNBits): the builder's recipe, its block size along the
    input channels, and the accuracy level of the activations it multiplies with (4: INT8 on the
    CPU, the builder's CPU default; None: the builder's default for the device)."""

    recipe: str = "auto"
    block_size: int = 32
    accuracy_level: int | None = None

    def __post_init__(self) -> None:
        if self.recipe not in ("auto", *LM_QUANT_RECIPES):
            raise ConfigError(f"expected one of {', '.join(LM_QUANT_RECIPES)}", field="lm_quant", value=self.recipe)
        if self.block_size not in LM_BLOCK_SIZES:
            raise ConfigError(
                f"expected one of {', '.join(map(str, LM_BLOCK_SIZES))}", field="lm_block_size", value=self.block_size
            )
        if self.accuracy_level is not None and self.accuracy_level not in (1, 2, 3, 4):
            raise ConfigError("expected 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)", field="lm_accuracy_level")

    def resolved(self, precision: str, widths: MatMulWidths | None = None) -> LMQuant:
        """``auto`` made concrete for a decoder of ``precision`` (int4 | int8) with these MatMul
        ``widths``: k_quant_mixed for INT4 where the k-quant pass can run at this block size (not in a
        test-sized model's odd widths), else the builder's default. An explicit k-quant recipe that
        cannot run is refused here, in one line, instead of failing inside the builder."""
        bits = 4 if precision == "int4" else 8
        refusal = None if widths is None else widths.k_quant_refusal(self.block_size, bits)
        if self.recipe != "auto":
            if refusal is not None and self.recipe.startswith("k_quant"):
                raise ConfigError(refusal, field="lm_quant", value=self.recipe, mentions=("lm_block_size",))
            return self
        recipe = AUTO_RECIPE[precision]
        if recipe.startswith("k_quant") and refusal is not None:
            recipe = "default"
        return replace(self, recipe=recipe)

    def extra_options(self) -> list[str]:
        """The builder's ``--extra_options`` for this (resolved) recipe."""
        options = [f"algo_config={self.recipe}", f"block_size={self.block_size}"]
        return options + ([f"accuracy_level={self.accuracy_level}"] if self.accuracy_level is not None else [])


#: ``--kv-cache``: fp, the decoder's own activation type (FP32 on the CPU, FP16 on CUDA); int8, the
#: builder's static INT8 KV cache with scales calibrated at build (calibration/kv_scales.py)
KV_CACHE_TYPES = ("fp", "int8")
#: the builder's scheme for an INT8 KV cache: one scale per key/value channel (post-RoPE keys have
#: outlier channels a per-tensor scale would round the rest of to a few levels; measured in
#: docs/language-model.md). Both run on ONNX Runtime's CPU GroupQueryAttention with past and
#: present bound to one buffer; the per-token schemes need CUDA PagedAttention.
KV_INT8_SCHEME = "int8_per_channel"
KV_SCHEMES = ("int8_per_channel", "int8_per_tensor")


@dataclass(frozen=True)
class DecoderOptions:
    """What the decoder serves and computes, besides its weights: the context its KV cache is
    allocated for (None: the model's own ``max_position_embeddings``), the LM head on the last
    position only during prefill (a prompt's other positions' logits are never used), and the KV
    cache's element type."""

    context: int | None = None
    prune_lm_head: bool = True
    kv_cache: str = "fp"
    #: the builder's INT8 scheme (``kv_cache == "int8"``); per-channel is the measured default
    kv_scheme: str = KV_INT8_SCHEME

    def __post_init__(self) -> None:
        if self.context is not None and (
            isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1
        ):
            raise ConfigError("expected a number of tokens >= 1", field="context", value=self.context)
        if self.kv_cache not in KV_CACHE_TYPES:
            raise ConfigError(f"expected one of {', '.join(KV_CACHE_TYPES)}", field="kv_cache", value=self.kv_cache)
        if self.kv_scheme not in KV_SCHEMES:
            raise ConfigError(f"expected one of {', '.join(KV_SCHEMES)}", field="kv_scheme", value=self.kv_scheme)

    def extra_options(self, kv_scale_file: Path | None = None) -> list[str]:
        """The builder's ``--extra_options`` for the LM head and, with ``kv_scale_file``, the KV cache."""
        options = ["prune_lm_head=true"] if self.prune_lm_head else []
        if self.kv_cache == "int8":
            if kv_scale_file is None:
                raise ConfigError("an INT8 KV cache needs calibrated scales", field="kv_cache", value=self.kv_cache)
            options += [f"kv_cache_quant_scheme={self.kv_scheme}", f"kv_cache_scale_file={kv_scale_file}"]
        return options


def max_context(checkpoint: Path) -> int:
    """The language model's own context (``max_position_embeddings``) from a LLaVA checkpoint's
    config.json: a json read, nothing loaded."""
    return int(_text_config(checkpoint)["max_position_embeddings"])


def set_context(decoder_dir: Path, context: int) -> None:
    """Make the decoder serve ``context`` tokens: genai_config.json's ``model.context_length`` (the
    KV cache the runtime allocates) and ``search.max_length``. The graph itself is unchanged: its
    rotary tables cover the model's whole context, of which the first ``context`` positions are used."""
    path = Path(decoder_dir) / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["context_length"] = context
    config.setdefault("search", {})["max_length"] = context
    path.write_text(json.dumps(config, indent=4))


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
    text = _text_config(checkpoint)
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


def build_decoder(
    lm_dir: Path,
    out: Path,
    precision: str,
    device: str = "cpu",
    quant: LMQuant | None = None,
    decoder: DecoderOptions | None = None,
    kv_scale_file: Path | None = None,
) -> None:
    """Run onnxruntime-genai's model builder for ``device`` (inputs_embeds in).

    ``cuda`` is the builder's CUDA target: FP16 activations, INT4/INT8 weights (MatMulNBits), the
    CUDA attention kernels and a genai_config naming the CUDA provider. It is written on any
    machine; ONNX Runtime's CPU provider also runs it, which is how a CPU workstation checks it.
    ``decoder``: the context, the pruned LM head and the KV cache (``kv_scale_file``: the calibrated
    INT8 scales, the builder's JSON); default ``DecoderOptions()``.
    """
    decoder = decoder or DecoderOptions()
    if device not in LM_DEVICES:
        raise ConfigError(f"expected one of {', '.join(LM_DEVICES)}", field="lm_device", value=device)
    if precision not in LM_PRECISIONS:
        raise ConfigError(f"expected one of {', '.join(LM_PRECISIONS)}", field="lm_precision", value=precision)
    require("lm", "building the language model", field="lm_precision")
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
        *(
            (quant or LMQuant()).resolved(precision, matmul_widths(lm_dir)).extra_options()
            if precision in ("int4", "int8")
            else []
        ),
        *decoder.extra_options(kv_scale_file),
    ]
    # the builder's cache defaults to ./cache_dir in the working directory
    # (temporary external data included): it goes beside lm_dir instead, and is removed however this ends
    with tempfile.TemporaryDirectory(prefix=".genai-builder-", dir=lm_dir.parent) as scratch:
        returncode, stderr = run_child([*command, "-c", str(Path(scratch) / "cache")])
    if returncode != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        raise CheckpointError(f"onnxruntime-genai model builder failed: {lines[-1] if lines else 'no output'}")
    if decoder.context is not None:
        set_context(out, decoder.context)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies, even by SIGKILL
    (``prctl(PR_SET_PDEATHSIG)``); None where there is no prctl. libc is looked up here, in the
    parent: the child runs between fork and exec, where loading a library is not safe."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def run_child(command: list[str], grace_s: float = 5.0) -> tuple[int, str]:
    """Run ``command`` (stdout discarded, stderr captured) so that it never outlives this process:
    on any exception here (Ctrl-C, SIGTERM's ``Terminated``) it is terminated, then killed after
    ``grace_s``; if this process is killed outright, Linux terminates it (PR_SET_PDEATHSIG).
    Returns the exit status and stderr."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent()
    )
    try:
        _, stderr = process.communicate()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()
    return process.returncode, stderr


def build_embedding_model(lm_dir: Path, out: Path, dtype: np.dtype) -> None:
    """``input_ids [B, S] int64 -> inputs_embeds [B, S, D]``: one Gather over the LM's table."""
    from safetensors import safe_open  # the [export] extra: importing this module must not need it

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
