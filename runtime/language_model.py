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

import ctypes
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def embedding_table(path: Path) -> np.ndarray | None:
    """The token table of an embedding graph that is a single Gather over an initializer (what the
    export writes), else None (the graph is run as it is)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    nodes, inits = model.graph.node, {init.name: init for init in model.graph.initializer}
    if len(nodes) != 1 or nodes[0].op_type != "Gather" or nodes[0].input[0] not in inits:
        return None
    if any(a.name == "axis" and a.i != 0 for a in nodes[0].attribute) or nodes[0].input[1] != model.graph.input[0].name:
        return None
    init = inits[nodes[0].input[0]]
    if init.data_location == onnx.TensorProto.EXTERNAL:
        onnx.load_external_data_for_tensor(init, str(path.parent))
    return numpy_helper.to_array(init)


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


class KVPool:
    """Keys and values of ``slots`` sequences, preallocated on the decoder's device for ``context``
    tokens each: per layer one [slots, kv_heads, context, head] buffer of keys and one of values.

    A slot is one sequence (``KVCache``). Past and present are bound to the same memory (by
    address: GroupQueryAttention shares the buffer when past and present are one pointer), so each
    decoder call writes its keys and values in place. ``step`` feeds one token to each of several
    slots in one call (continuous batching: GroupQueryAttention reads each row's own length from
    the attention mask); ``KVCache.step`` prefills one slot. Every decoder call on a pool, and
    every read or write of its rows' lengths, holds its lock: a batched step writes into every row
    it spans. ``save`` and ``restore`` move a sequence's tokens out of a slot and back (a server
    holds a conversation between turns without holding a slot).
    """

    def __init__(self, model: LanguageModel, slots: int, context: int | None = None) -> None:
        ort = import_onnxruntime()

        context = model.context_length if context is None else context
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise BundleError(f"{slots!r} KV slots; expected an integer >= 1", field="slots")
        if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= model.context_length:
            raise BundleError(
                f"a context of {context!r} tokens; expected 1..{model.context_length} (the bundle's)", field="context"
            )
        self.model, self.slots, self.context = model, slots, context
        self.shape = (slots, model.kv_heads, context, model.head_size)
        self._buffers = [
            ort.OrtValue.ortvalue_from_shape_and_type(list(self.shape), model.kv_dtype, model.device, 0)
            for _ in range(2 * model.layers)
        ]
        self.row_bytes = model.kv_heads * context * model.head_size * model.kv_itemsize  # one slot, one buffer
        self.lengths = [0] * slots  # tokens cached per slot
        self._free = list(range(slots))
        self._available = threading.Condition()
        self.lock = threading.Lock()  # one decoder call, or one move of a row's tokens, at a time
        self._step_bindings: dict[int, Any] = {}
        self._copier: _DeviceCopy | None = None

    @property
    def slot_bytes(self) -> int:
        """KV bytes of one slot (keys and values of every layer, the whole context)."""
        return len(self._buffers) * self.row_bytes

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def token_bytes(self) -> int:
        """KV bytes of one cached token (every layer's key and value)."""
        return self.slot_bytes // self.context

    def acquire(self, timeout: float | None = None) -> KVCache | None:
        """A free slot as an empty ``KVCache``; when none is free, wait up to ``timeout`` seconds
        (None: forever) and return None if none came free."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._available:
            while not self._free:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._available.wait(left)
            slot = self._free.pop(0)  # the lowest free row: a batched step spans fewer idle rows
            with self.lock:
                self.lengths[slot] = 0
            return KVCache(self, slot)

    def release(self, cache: KVCache) -> None:
        """Give ``cache``'s slot back (its contents are dropped); idempotent."""
        with self._available:
            if cache.pool is self and not cache.released:
                cache.released = True
                with self.lock:
                    self.lengths[cache.slot] = 0
                self._free.append(cache.slot)
                self._free.sort()
                self._available.notify()

    def bind_rows(self, binding: Any, first: int, rows: int) -> None:
        """Bind past and present of every layer to the rows [first, first + rows) of the buffers."""
        model = self.model
        inputs, outputs = model.names
        shape = [rows, model.kv_heads, self.context, model.head_size]
        names = [
            (inputs[past] % layer, outputs[present] % layer)
            for layer in range(model.layers)
            for past, present in (("past_key_names", "present_key_names"), ("past_value_names", "present_value_names"))
        ]
        for (past, present), buffer in zip(names, self._buffers, strict=True):
            address = buffer.data_ptr() + first * self.row_bytes
            binding.bind_input(past, model.device, 0, model.kv_dtype, shape, address)
            binding.bind_output(present, model.device, 0, model.kv_dtype, shape, address)

    def step(self, caches: Sequence[KVCache], inputs_embeds: np.ndarray) -> np.ndarray:
        """One decoder call feeding ``inputs_embeds[i]`` ([len(caches), 1, D]) after what
        ``caches[i]`` holds; returns their next-token logits [len(caches), vocab] (float32).

        The call spans the rows 0..max(slot): a row not being decoded gets a dummy token written
        just past its own content (never read: the row's next real token overwrites it; a full
        row's last position, which nothing can follow), so its content is left as it was."""
        model = self.model
        if any(cache.pool is not self or cache.released for cache in caches):
            raise BundleError("language model: a KV cache of another pool (or a released one) in a batched step")
        rows = max(cache.slot for cache in caches) + 1
        fed = np.zeros((rows, 1, inputs_embeds.shape[-1]), model.embeds_dtype)
        fed[[cache.slot for cache in caches]] = inputs_embeds
        inputs, outputs = model.names
        with self.lock:
            lengths = self.lengths[:rows]
            for cache in caches:
                if lengths[cache.slot] >= self.context:
                    raise BundleError(f"language model: a sequence reached the context of {self.context} tokens")
            written = [min(length, self.context - 1) for length in lengths]  # the position each row writes
            mask = np.zeros((rows, max(written) + 1), np.int64)
            for row, position in enumerate(written):
                mask[row, : position + 1] = 1
            binding = self._step_bindings.get(rows)
            if binding is None:
                binding = self._step_bindings[rows] = model.decoder.io_binding()
                self.bind_rows(binding, 0, rows)
            binding.bind_cpu_input(inputs["inputs_embeds"], fed)
            binding.bind_cpu_input(inputs["attention_mask"], mask)
            binding.bind_output(outputs["logits"], "cpu")
            model.decoder.run_with_iobinding(binding)
            logits = binding.get_outputs()[model.logits_index].numpy()
            for cache in caches:
                self.lengths[cache.slot] += 1
        return logits[[cache.slot for cache in caches], -1].astype(np.float32)

    def save(self, cache: KVCache) -> KVSnapshot:
        """``cache``'s tokens, copied out of the pool (its slot can then be released): on the CPU
        only the cached tokens, on a device every buffer's whole row, in device memory."""
        with self.lock:
            length = self.lengths[cache.slot]
            if self.model.device == "cpu":
                views = self._host_views()
                parts = [np.ascontiguousarray(view[cache.slot, :, :length]) for view in views]
                return KVSnapshot(length, parts, sum(part.nbytes for part in parts))
            copier = self._device_copy()
            parts = [copier.new_row() for _ in self._buffers]
            for buffer, part in zip(self._buffers, parts, strict=True):
                copier.copy(buffer.data_ptr() + cache.slot * self.row_bytes, part.data_ptr())
            return KVSnapshot(length, parts, len(parts) * self.row_bytes)

    def restore(self, snapshot: KVSnapshot, cache: KVCache) -> None:
        """Put ``snapshot``'s tokens into ``cache``'s slot (its length becomes the snapshot's)."""
        if snapshot.length > self.context:
            raise BundleError(f"language model: {snapshot.length} saved tokens exceed the context of {self.context}")
        with self.lock:
            if self.model.device == "cpu":
                for view, part in zip(self._host_views(), snapshot.parts, strict=True):
                    view[cache.slot, :, : snapshot.length] = part
            else:
                copier = self._device_copy()
                for buffer, part in zip(self._buffers, snapshot.parts, strict=True):
                    copier.copy(part.data_ptr(), buffer.data_ptr() + cache.slot * self.row_bytes)
            self.lengths[cache.slot] = snapshot.length

    def _host_views(self) -> list[np.ndarray]:
        """numpy views of the CPU buffers (no copy: the same memory the decoder reads)."""
        dtype = np.dtype(self.model.kv_dtype)
        views = []
        for buffer in self._buffers:
            raw = (ctypes.c_byte * (self.slots * self.row_bytes)).from_address(buffer.data_ptr())
            views.append(np.frombuffer(raw, dtype).reshape(self.shape))
        return views

    def _device_copy(self) -> _DeviceCopy:
        if self._copier is None:
            self._copier = _DeviceCopy(self)
        return self._copier


@dataclass
class KVSnapshot:
    """A sequence's keys and values out of the pool: ``length`` tokens, ``nbytes`` held."""

    length: int
    parts: list[Any]  # per buffer: numpy [kv_heads, length, head] (CPU) or a device OrtValue row
    nbytes: int


class _DeviceCopy:
    """Row copies in device memory with ONNX Runtime alone (no CUDA binding in Python): a one-node
    Identity graph on the decoder's provider, its input and output bound by address."""

    def __init__(self, pool: KVPool) -> None:
        import onnx
        from onnx import helper

        ort = import_onnxruntime()
        model = pool.model
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(model.kv_dtype))
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "kv_copy",
            [helper.make_tensor_value_info("x", elem, ["n"])],
            [helper.make_tensor_value_info("y", elem, ["n"])],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        self.pool, self.ort = pool, ort
        self.session = ort.InferenceSession(proto.SerializeToString(), providers=model.decoder.get_providers())
        self.count = pool.row_bytes // model.kv_itemsize

    def new_row(self) -> Any:
        model = self.pool.model
        return self.ort.OrtValue.ortvalue_from_shape_and_type([self.count], model.kv_dtype, model.device, 0)

    def copy(self, source: int, target: int) -> None:
        model = self.pool.model
        binding = self.session.io_binding()
        binding.bind_input("x", model.device, 0, model.kv_dtype, [self.count], source)
        binding.bind_output("y", model.device, 0, model.kv_dtype, [self.count], target)
        self.session.run_with_iobinding(binding)


class KVCache:
    """One sequence's keys and values: a slot of a ``KVPool``, ``length`` tokens cached.

    ``step`` prefills it alone (batch 1, any number of tokens); ``KVPool.step`` decodes it with
    others. ``LanguageModel.new_cache`` gives a cache with a pool of its own.
    """

    def __init__(self, pool: KVPool, slot: int) -> None:
        self.pool, self.slot = pool, slot
        self.model = pool.model
        self.capacity = pool.context
        self.released = False
        self._binding: Any = None

    @property
    def length(self) -> int:
        return self.pool.lengths[self.slot]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's buffers (the whole context, whatever ``length`` is)."""
        return self.pool.slot_bytes

    def release(self) -> None:
        """Give the slot back to its pool (a server's next sequence takes it)."""
        self.pool.release(self)

    def step(self, inputs_embeds: np.ndarray, every_position: bool = False) -> np.ndarray:
        """Feed [1, S, D] embeddings after the cached ones; returns the last position's logits
        (float32), or with ``every_position`` the [S, vocab] logits of each fed position (the
        teacher-forced figures of language-model parity)."""
        count = inputs_embeds.shape[1]
        model = self.model
        inputs, outputs = model.names
        with self.pool.lock:
            if self.released:
                raise BundleError("language model: this KV cache was released")
            length = self.pool.lengths[self.slot]
            if length + count > self.capacity:
                raise BundleError(f"language model: {length + count} tokens exceed the context of {self.capacity}")
            if self._binding is None:
                self._binding = model.decoder.io_binding()
                self.pool.bind_rows(self._binding, self.slot, 1)
            binding = self._binding
            binding.bind_cpu_input(inputs["inputs_embeds"], np.ascontiguousarray(inputs_embeds, model.embeds_dtype))
            binding.bind_cpu_input(inputs["attention_mask"], np.ones((1, length + count), np.int64))
            binding.bind_output(outputs["logits"], "cpu")  # only the logits come back to the host
            model.decoder.run_with_iobinding(binding)
            self.pool.lengths[self.slot] += count
            logits = binding.get_outputs()[model.logits_index].numpy()
            if count > 1:  # a prefill: the binding would keep its [1, S, vocab] logits and the prompt alive
                binding.bind_output(outputs["logits"], "cpu")
                binding.bind_cpu_input(
                    inputs["inputs_embeds"], np.zeros((1, 1, inputs_embeds.shape[-1]), model.embeds_dtype)
                )
        return logits[0].astype(np.float32) if every_position else logits[0, -1].astype(np.float32)


class LanguageModel:
    """The bundle's decoder and token embeddings. ``context``: tokens a sequence may hold, at most
    the bundle's (a smaller one allocates smaller KV caches)."""

    def __init__(self, directory: Path, device: str = "cpu", context: int | None = None) -> None:
        ort = import_onnxruntime()

        directory = Path(directory)
        config_path = directory / "decoder" / GENAI_CONFIG
        config = read_genai_config(config_path)
        decoder = config["decoder"]
        self.device = device
        self.context_length = built = config["context_length"]
        if context is not None:
            if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= built:
                raise BundleError(
                    f"a context of {context!r} tokens; expected 1..{built} (the bundle's)", field="context"
                )
            self.context_length = context
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
        # the lookup runs on the CPU, the device gets the embeddings with the step's input: a plain
        # table (no ONNX Runtime call per token) when the graph is the one Gather the export writes
        embed = directory / "embed.onnx"
        self.embedder = create_session(embed, options, ["CPUExecutionProvider"], path=embed)
        self._table = embedding_table(embed)
        if self._table is not None:
            self.embedder = None  # the table is the whole model: do not hold it twice
        types = {i.name: i.type for i in self.decoder.get_inputs()}
        self.embeds_dtype = ORT_NUMPY_TYPES[types[self.names[0]["inputs_embeds"]]]
        self.kv_dtype = ORT_NUMPY_TYPES[types[self.names[0]["past_key_names"] % 0]]
        self.kv_itemsize = np.dtype(self.kv_dtype).itemsize
        # IOBinding returns outputs in the order they were bound: every present, then the logits
        self.logits_index = 2 * self.layers

    def embed(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """[S] token ids -> [1, S, D] embeddings in the decoder's input type."""
        array = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if self._table is not None:
            if array.size and (array.min() < 0 or array.max() >= len(self._table)):
                raise BundleError(f"language model: a token id outside the vocabulary of {len(self._table)}")
            return self._table[array].astype(self.embeds_dtype, copy=False)
        assert self.embedder is not None
        return self.embedder.run(None, {"input_ids": array})[0].astype(self.embeds_dtype)

    def kv_slot_bytes(self, context: int | None = None) -> int:
        """KV bytes one sequence holds for ``context`` tokens (default: this model's context)."""
        context = self.context_length if context is None else context
        return 2 * self.layers * self.kv_heads * context * self.head_size * self.kv_itemsize

    def new_cache(self, context: int | None = None) -> KVCache:
        """An empty cache in a pool of its own (one sequence)."""
        cache = KVPool(self, 1, context).acquire()
        assert cache is not None  # a new pool's one slot is free
        return cache

    def prefill(self, cache: KVCache, inputs_embeds: np.ndarray) -> np.ndarray:
        """Feed ``inputs_embeds`` after what ``cache`` holds; the last position's logits (the
        decoding interface ``ContinuousBatcher`` also has)."""
        return cache.step(inputs_embeds)

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
        [1, S, D] ``prompt`` then ``answer`` fed (its last token predicted, not fed), a fresh cache.
        A decoder whose LM head was pruned returns the last fed position's logits only, so the
        answer is fed one token per step there (the same logits, one decoder call per token)."""
        cache = self.new_cache()
        fed = prompt.astype(self.embeds_dtype)
        if self._last_position_only():
            return np.stack([cache.step(fed), *(cache.step(self.embed([token])) for token in answer[:-1])])
        if len(answer) > 1:
            fed = np.concatenate([fed, self.embed(answer[:-1])], axis=1)
        return cache.step(fed, every_position=True)[-len(answer) :]

    def _last_position_only(self) -> bool:
        """Whether the decoder was built with a pruned LM head (the builder's ``prune_lm_head``):
        its logits are [batch, 1, vocab], the last fed position's, whatever was fed."""
        logits = next(o for o in self.decoder.get_outputs() if o.name == self.names[1]["logits"])
        return len(logits.shape) == 3 and logits.shape[1] == 1
