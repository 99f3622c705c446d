"""The bundle's language model in ONNX Runtime: embedding lookup, prefill, decode with a KV cache
that is written in place.

The decoder is onnxruntime-genai's builder output (``inputs_embeds``, ``attention_mask``,
``past_key_values.N.key/value`` -> ``logits``, ``present.N.key/value``) around
GroupQueryAttention. Its past and present tensors are bound (ORT IOBinding) to the same
preallocated buffers of the context length (GroupQueryAttention's past_present_share_buffer, the
mode onnxruntime-genai's own generator uses): each step writes its keys and values at the current
position and no step copies the cache, on the CPU or on a CUDA device. The cache outlives a
generation, so a conversation's next turn prefills only its own tokens (runtime/conversation.py).
No torch: this runs on a Jetson next to the TensorRT vision engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ccra_export.core.errors import BackendUnavailableError, BundleError, CCRAExportError, Remedy
from ccra_export.core.genai_config import GENAI_CONFIG, read_genai_config
from ccra_export.core.manifest import bundle_path
from ccra_export.runtime.ort_session import import_onnxruntime
from ccra_export.runtime.vision_backend import ORT_NUMPY_TYPES, available_providers, create_session

LM_DEVICES = ("cpu", "cuda")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


MAX_SEED = 2**64 - 1


@dataclass
class Sampling:
    """How the next token is chosen. Greedy when ``temperature == 0``; otherwise temperature plus
    nucleus (top-p) sampling. ``top_p == 0`` keeps only the most likely token (greedy, as other
    runtimes read it): the top token is always kept. ``seed`` in [0, 2**64) makes sampling
    repeatable. Values are checked here, so the CLI, the Python API and the server refuse the same
    things in the same words."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"{self.max_new_tokens!r}; expected an integer >= 1", field="max_new_tokens")
        if not _real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"{self.temperature!r}; expected a finite number >= 0 (0: greedy)", field="temperature")
        if not _real(self.top_p) or not 0.0 <= self.top_p <= 1.0:  # NaN fails both comparisons
            raise SamplingError(f"{self.top_p!r}; expected a number in [0, 1] (0: the top token only)", field="top_p")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED
        ):
            raise SamplingError(f"{self.seed!r}; expected an integer in [0, 2**64)", field="seed")

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.temperature == 0.0 or self.top_p == 0.0:
            return int(np.argmax(logits))
        # subtract the maximum before dividing: a tiny temperature then sends the rest to -inf, not NaN
        with np.errstate(over="ignore"):  # a tiny temperature sends all but the top token to -inf
            scaled = (logits.astype(np.float64) - logits.max()) / self.temperature
        probs = np.exp(scaled)
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < self.top_p  # smallest set reaching top_p
        keep[0] = True  # the most likely token always stays
        kept = order[keep]
        return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))


class SamplingError(CCRAExportError):
    """A sampling parameter outside its domain (NaN temperature, top-p above 1, a negative seed)."""


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Generation:
    tokens: list[int]
    first_logits: np.ndarray  # logits of the first generated position (parity checks)
    prefill_s: float
    decode_s: float
    prefill_tokens: int = 0  # tokens this call fed before its first new token


def lm_providers(device: str, where: str = "language model") -> list[str]:
    """ONNX Runtime providers for a language model built for ``device``; one line when missing."""
    if device not in LM_DEVICES:
        raise BundleError(f"{where}: device {device!r}, expected one of {', '.join(LM_DEVICES)}")
    if _PROVIDERS[device] not in available_providers():
        raise BackendUnavailableError(
            f"{where} was built for CUDA and this ONNX Runtime has no CUDAExecutionProvider: install the "
            "onnxruntime-gpu build for your CUDA (and only it), or rebuild the bundle for this machine",
            remedy=Remedy("build", (("lm_device", "cpu"),), complete=False),
        )
    return [_PROVIDERS[device]] if device == "cpu" else [_PROVIDERS[device], _PROVIDERS["cpu"]]


class KVCache:
    """One sequence's keys and values, preallocated for the whole context on the decoder's device.

    Past and present outputs are bound to the same buffers, so GroupQueryAttention writes each
    step's keys/values in place (past_present_share_buffer). ``length`` tokens are cached.
    """

    def __init__(self, model: LanguageModel) -> None:
        ort = import_onnxruntime()

        self.model = model
        self.capacity = model.context_length
        self.length = 0
        self.binding = model.decoder.io_binding()
        inputs, outputs = model.names
        shape = [1, model.kv_heads, self.capacity, model.head_size]
        self._buffers = []
        for layer in range(model.layers):
            for past, present in (("past_key_names", "present_key_names"), ("past_value_names", "present_value_names")):
                buffer = ort.OrtValue.ortvalue_from_shape_and_type(shape, model.kv_dtype, model.device, 0)
                self.binding.bind_ortvalue_input(inputs[past] % layer, buffer)
                self.binding.bind_ortvalue_output(outputs[present] % layer, buffer)
                self._buffers.append(buffer)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's buffers (the whole context, whatever ``length`` is)."""
        return len(self._buffers) * self.model.kv_heads * self.capacity * self.model.head_size * self.model.kv_itemsize

    def step(self, inputs_embeds: np.ndarray, every_position: bool = False) -> np.ndarray:
        """Feed [1, S, D] embeddings after the cached ones; returns the last position's logits
        (float32), or with ``every_position`` the [S, vocab] logits of each fed position (the
        teacher-forced figures of language-model parity)."""
        count = inputs_embeds.shape[1]
        if self.length + count > self.capacity:
            raise BundleError(f"language model: {self.length + count} tokens exceed the context of {self.capacity}")
        inputs, outputs = self.model.names
        binding = self.binding
        binding.bind_cpu_input(inputs["inputs_embeds"], np.ascontiguousarray(inputs_embeds, self.model.embeds_dtype))
        binding.bind_cpu_input(inputs["attention_mask"], np.ones((1, self.length + count), np.int64))
        binding.bind_output(outputs["logits"], "cpu")  # only the logits come back to the host
        self.model.decoder.run_with_iobinding(binding)
        self.length += count
        logits = binding.get_outputs()[self.model.logits_index].numpy()
        return logits[0].astype(np.float32) if every_position else logits[0, -1].astype(np.float32)


class LanguageModel:
    def __init__(self, directory: Path, device: str = "cpu") -> None:
        ort = import_onnxruntime()

        directory = Path(directory)
        config_path = directory / "decoder" / GENAI_CONFIG
        config = read_genai_config(config_path)
        decoder = config["decoder"]
        self.device = device
        self.context_length = config["context_length"]
        self.layers = decoder["num_hidden_layers"]
        self.kv_heads = decoder["num_key_value_heads"]
        self.head_size = decoder["head_size"]
        self.names = decoder["inputs"], decoder["outputs"]
        self.eos_ids = set(config["eos_token_id"])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = lm_providers(device, f"{directory}: the language model")
        decoder_path = bundle_path(directory / "decoder", decoder["filename"], f"{config_path}: model.decoder.filename")
        self.decoder = create_session(decoder_path, options, providers, path=decoder_path)
        # one Gather per token: the CPU does it, the device gets the embeddings with the step's input
        embed = directory / "embed.onnx"
        self.embedder = create_session(embed, options, ["CPUExecutionProvider"], path=embed)
        types = {i.name: i.type for i in self.decoder.get_inputs()}
        self.embeds_dtype = ORT_NUMPY_TYPES[types[self.names[0]["inputs_embeds"]]]
        self.kv_dtype = ORT_NUMPY_TYPES[types[self.names[0]["past_key_names"] % 0]]
        self.kv_itemsize = np.dtype(self.kv_dtype).itemsize
        # IOBinding returns outputs in the order they were bound: every present, then the logits
        self.logits_index = 2 * self.layers

    def embed(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """[S] token ids -> [1, S, D] embeddings in the decoder's input type."""
        array = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        return self.embedder.run(None, {"input_ids": array})[0].astype(self.embeds_dtype)

    def new_cache(self) -> KVCache:
        return KVCache(self)

    def decode(
        self,
        cache: KVCache,
        inputs_embeds: np.ndarray,
        sampling: Sampling,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Prefill ``inputs_embeds`` after what ``cache`` holds, then sample up to
        ``sampling.max_new_tokens`` tokens. The last token chosen is returned but not fed: the
        caller feeds it with whatever comes next (a conversation's next turn)."""
        rng = np.random.default_rng(sampling.seed)
        tokens: list[int] = []
        start = time.perf_counter()
        logits = first = cache.step(inputs_embeds)
        prefill_s = time.perf_counter() - start
        for step in range(sampling.max_new_tokens):
            if step:
                logits = cache.step(self.embed([tokens[-1]]))
            token = sampling.choose(logits, rng)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in sampling.stop_ids:
                break
        decode_s = time.perf_counter() - start - prefill_s
        return Generation(tokens, first, prefill_s, decode_s, int(inputs_embeds.shape[1]))

    def generate(
        self, inputs_embeds: np.ndarray, sampling: Sampling, on_token: Callable[[int], None] | None = None
    ) -> Generation:
        """One prompt, a fresh cache."""
        return self.decode(self.new_cache(), inputs_embeds, sampling, on_token)

    def answer_logits(self, prompt: np.ndarray, answer: list[int]) -> np.ndarray:
        """Teacher forcing: [len(answer), vocab] next-token logits at each answer position, the
        [1, S, D] ``prompt`` then ``answer`` fed (its last token predicted, not fed), a fresh cache."""
        fed = prompt.astype(self.embeds_dtype)
        if len(answer) > 1:
            fed = np.concatenate([fed, self.embed(answer[:-1])], axis=1)
        return self.new_cache().step(fed, every_position=True)[-len(answer) :]
