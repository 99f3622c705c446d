"""The bundle's language model in ONNX Runtime: embedding lookup, prefill, decode with KV cache.

The decoder is onnxruntime-genai's builder output (``inputs_embeds``, ``attention_mask``,
``past_key_values.N.key/value`` -> ``logits``, ``present.N.key/value``); its genai_config.json
names the tensors. No torch: this runs on a Jetson next to the TensorRT vision engine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ccra_export.runtime.vision_backend import ORT_NUMPY_TYPES


@dataclass
class Sampling:
    """Greedy when ``temperature == 0``; otherwise temperature + nucleus (top-p) sampling."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: set[int] = field(default_factory=set)

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.temperature <= 0.0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < self.top_p  # smallest set reaching top_p
        kept = order[keep]
        return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))


@dataclass
class Generation:
    tokens: list[int]
    first_logits: np.ndarray  # logits of the first generated position (parity checks)
    prefill_s: float
    decode_s: float


class LanguageModel:
    def __init__(self, directory: Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        directory = Path(directory)
        config = json.loads((directory / "decoder" / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        self.context_length = int(config.get("context_length", 4096))
        self.layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self.names = decoder["inputs"], decoder["outputs"]
        self.eos_ids = set(np.atleast_1d(config.get("eos_token_id", [])).tolist())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        chosen = providers or ["CPUExecutionProvider"]
        self.decoder = ort.InferenceSession(str(directory / "decoder" / decoder["filename"]), options, providers=chosen)
        self.embedder = ort.InferenceSession(str(directory / "embed.onnx"), options, providers=chosen)
        types = {i.name: i.type for i in self.decoder.get_inputs()}
        self.embeds_dtype = ORT_NUMPY_TYPES[types[self.names[0]["inputs_embeds"]]]
        self.kv_dtype = ORT_NUMPY_TYPES[types[self.names[0]["past_key_names"] % 0]]
        self._outputs = [o.name for o in self.decoder.get_outputs()]

    def embed(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """[S] token ids -> [1, S, D] embeddings in the decoder's input type."""
        array = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        return self.embedder.run(None, {"input_ids": array})[0].astype(self.embeds_dtype)

    def _empty_past(self) -> dict[str, np.ndarray]:
        inputs = self.names[0]
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), self.kv_dtype)
        return {
            name % layer: empty
            for layer in range(self.layers)
            for name in (inputs["past_key_names"], inputs["past_value_names"])
        }

    def generate(
        self, inputs_embeds: np.ndarray, sampling: Sampling, on_token: Callable[[int], None] | None = None
    ) -> Generation:
        inputs, outputs = self.names
        rng = np.random.default_rng(sampling.seed)
        stop = sampling.stop_ids
        past, x, total = self._empty_past(), inputs_embeds.astype(self.embeds_dtype), inputs_embeds.shape[1]
        tokens: list[int] = []
        first = None
        start = time.perf_counter()
        prefill_s = 0.0
        for _ in range(sampling.max_new_tokens):
            feeds = {inputs["inputs_embeds"]: x, inputs["attention_mask"]: np.ones((1, total), np.int64), **past}
            result = dict(zip(self._outputs, self.decoder.run(self._outputs, feeds), strict=True))
            logits = result[outputs["logits"]][0, -1].astype(np.float32)
            if first is None:
                first, prefill_s = logits, time.perf_counter() - start
            token = sampling.choose(logits, rng)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop:
                break
            past = {
                inputs[kind] % layer: result[outputs[present] % layer]
                for layer in range(self.layers)
                for kind, present in (
                    ("past_key_names", "present_key_names"),
                    ("past_value_names", "present_value_names"),
                )
            }
            x, total = self.embed([token]), total + 1
        return Generation(tokens, first, prefill_s, time.perf_counter() - start - prefill_s)
