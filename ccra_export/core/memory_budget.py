"""A served bundle's memory budget: what it holds before any conversation, what each decode slot
adds, and how many slots fit in a Jetson module's memory.

A Jetson's DRAM is shared by the CPU and the GPU, so weights, engines, the KV caches, the tower
cache and the process itself all come out of one pool, next to JetPack and the OS. Pure
arithmetic over numbers read elsewhere (``workflows.doctor`` reads them from a bundle): no torch,
no ONNX Runtime, so ``serve`` can size its ``--parallel`` default with ``slots_that_fit``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ccra_export.core.errors import CCRAExportError, ConfigError

MIB = 1 << 20
GIB = 1 << 30


class MemoryBudgetError(CCRAExportError):
    """The bundle does not fit the memory it is asked to fit (the message says how much is missing)."""


@dataclass(frozen=True)
class JetsonModule:
    """One Jetson module: its DRAM (shared by CPU and GPU) and what is assumed taken before us."""

    name: str
    title: str
    memory_bytes: int
    #: firmware carveouts, CMA, the kernel and a headless JetPack (Ubuntu and its services): an assumption
    system_bytes: int

    @property
    def available_bytes(self) -> int:
        """What is left to the server once JetPack, the OS and the CUDA runtime have their share."""
        return self.memory_bytes - self.system_bytes - CUDA_RUNTIME_BYTES


#: the CUDA context and the libraries a TensorRT engine or ONNX Runtime's CUDA provider load (cuBLAS,
#: cuDNN, TensorRT's own): an assumption, not measured here (this machine has no GPU)
CUDA_RUNTIME_BYTES = 512 * MIB

#: What JetPack and the OS are assumed to hold, not an NVIDIA figure (NVIDIA publishes none per
#: module): the firmware carveouts and CMA make an 8 GB Orin show ~7.6 GiB to Linux, and a headless
#: JetPack 6 idles near 1 GiB; a desktop session takes about 1 GiB more. Larger modules reserve
#: more for carveouts and page tables.
JETSON_MODULES: tuple[JetsonModule, ...] = (
    JetsonModule("orin-nano-8gb", "Jetson Orin Nano 8GB", 8 * GIB, 3 * GIB // 2),
    JetsonModule("orin-nx-16gb", "Jetson Orin NX 16GB", 16 * GIB, 2 * GIB),
    JetsonModule("agx-orin-32gb", "Jetson AGX Orin 32GB", 32 * GIB, 5 * GIB // 2),
    JetsonModule("agx-orin-64gb", "Jetson AGX Orin 64GB", 64 * GIB, 3 * GIB),
)
JETSON_MODULE_NAMES = tuple(module.name for module in JETSON_MODULES)


def jetson_module(name: str) -> JetsonModule:
    """The module called ``name``; one line listing the known ones otherwise."""
    for module in JETSON_MODULES:
        if module.name == name:
            return module
    raise ConfigError(
        f"unknown Jetson module; expected one of {', '.join(JETSON_MODULE_NAMES)}", field="device", value=name
    )


@dataclass(frozen=True)
class KVLayout:
    """A decoder's KV cache: per layer one key and one value tensor of [kv_heads, context, head_size]
    per sequence, in the type of the decoder's ``past_key_values`` inputs."""

    layers: int
    kv_heads: int
    head_size: int
    dtype: str  # numpy's name of the past_key_values type: float32, float16, int8, ...
    itemsize: int
    max_context: int  # the bundle's context length

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_size * self.itemsize

    def slot_bytes(self, context: int) -> int:
        """One sequence's KV cache, preallocated for ``context`` tokens (the runtime allocates it whole)."""
        return self.bytes_per_token * context


@dataclass(frozen=True)
class RuntimeOverhead:
    """What the serving process holds beyond weights and KV: the interpreter and its libraries, ONNX
    Runtime's arenas, activations, pre-packed weights. ``how``: where the figure comes from."""

    bytes: int
    how: str


#: Measured as ``ccra-export doctor --bundle B --measure`` measures (``workflows.doctor.measure_overhead``:
#: the peak RSS of a fresh process that imports the server, loads the bundle's pipeline on ONNX
#: Runtime's CPU provider and answers one question, less the weights' file bytes and the KV bytes it
#: wrote), 2026-12-07 on an x86-64 machine (AMD EPYC, 2 cores, Python 3.11, ONNX Runtime 1.32): 420.6
#: MiB for a 0.5B-class bundle (24-layer INT4 decoder, 32k vocabulary, context 4096), 120 MiB for the
#: shipped demo (a 4-layer decoder: mostly the interpreter and its libraries, 71 MiB of it the imports
#: alone). The larger figure, rounded up: the overhead grows with the model, so measure a bigger one.
MEASURED_OVERHEAD = RuntimeOverhead(
    bytes=421 * MIB,
    how="recorded: measured 2026-12-07 on an x86-64 CPU with ONNX Runtime 1.32 for a 0.5B-class INT4 bundle "
    "(120 MiB for the demo); a larger model needs more",
)


@dataclass(frozen=True)
class Footprint:
    """What a served bundle holds before its first conversation."""

    decoder_bytes: int  # the decoder's ONNX file and its external data
    embeddings_bytes: int  # the token-embedding graph (and its data)
    vision_bytes: int  # the vision graphs, or engines where the bundle has them
    vision_kind: str  # "ONNX graphs" or "TensorRT engines"
    tower_cache_bytes: int  # the tower-output cache's bound (0: single-graph bundle, or disabled)
    tower_image_bytes: int  # one image's tower output (0: single-graph bundle)
    overhead: RuntimeOverhead

    @property
    def weights_bytes(self) -> int:
        return self.decoder_bytes + self.embeddings_bytes + self.vision_bytes

    @property
    def fixed_bytes(self) -> int:
        """Everything but the KV slots."""
        return self.weights_bytes + self.tower_cache_bytes + self.overhead.bytes


def slots_that_fit(budget_bytes: int, slot_bytes: int) -> int:
    """Whole KV slots of ``slot_bytes`` each that ``budget_bytes`` holds (0 when not one does)."""
    if slot_bytes <= 0:
        raise ValueError(f"a KV slot must take bytes, got {slot_bytes}")
    return max(0, budget_bytes) // slot_bytes


def context_that_fits(budget_bytes: int, slots: int, kv: KVLayout) -> int:
    """The longest context (at most the bundle's) at which ``slots`` slots fit in ``budget_bytes``."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    return min(kv.max_context, max(0, budget_bytes) // (slots * kv.bytes_per_token))


@dataclass(frozen=True)
class SlotFit:
    """How ``slots`` slots of ``context`` tokens fare in one module."""

    module: JetsonModule
    context: int
    kv_budget_bytes: int  # what the module leaves for KV caches once the bundle's fixed part is in (may be < 0)
    slots: int  # how many slots of ``context`` tokens fit
    #: the context at which ``wanted`` slots fit (0: not even one token each)
    context_for_wanted: int
    wanted: int


@dataclass(frozen=True)
class MemoryBudget:
    """A bundle's footprint, its KV layout, and the context and parallel slots it would serve with."""

    footprint: Footprint
    kv: KVLayout
    context: int
    parallel: int

    @property
    def slot_bytes(self) -> int:
        return self.kv.slot_bytes(self.context)

    @property
    def kv_bytes(self) -> int:
        return self.parallel * self.slot_bytes

    @property
    def total_bytes(self) -> int:
        return self.footprint.fixed_bytes + self.kv_bytes

    def fit(self, module: JetsonModule) -> SlotFit:
        left = module.available_bytes - self.footprint.fixed_bytes
        return SlotFit(
            module=module,
            context=self.context,
            kv_budget_bytes=left,
            slots=slots_that_fit(left, self.slot_bytes),
            context_for_wanted=context_that_fits(left, self.parallel, self.kv),
            wanted=self.parallel,
        )


def plan(footprint: Footprint, kv: KVLayout, context: int | None = None, parallel: int = 1) -> MemoryBudget:
    """The budget at ``context`` tokens per slot (None: the bundle's) for ``parallel`` slots; a
    context above the bundle's, or fewer than one slot or token, is refused in one line."""
    context = kv.max_context if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= kv.max_context:
        raise ConfigError(f"expected 1..{kv.max_context} tokens (the bundle's context)", field="context", value=context)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError("expected at least 1 slot", field="parallel", value=parallel)
    return MemoryBudget(footprint, kv, context, parallel)


def require_fit(budget: MemoryBudget, module: JetsonModule) -> SlotFit:
    """``budget.fit(module)``, or a one-line refusal saying how much memory is missing for the
    slots asked for, and at which context they would fit."""
    fit = budget.fit(module)
    if fit.slots >= budget.parallel:
        return fit
    missing = budget.total_bytes - module.available_bytes
    slots = f"{budget.parallel} slots" if budget.parallel > 1 else "one slot"
    hint = (
        f"; at a {{context}} of {fit.context_for_wanted} tokens {slots} fit"
        if fit.context_for_wanted >= 1
        else "; no context fits: a smaller decoder (lower precision) or a larger module"
    )
    raise MemoryBudgetError(
        f"{module.title} cannot hold {slots} of {budget.context} tokens: the bundle needs "
        f"{gib(budget.footprint.fixed_bytes)} before its KV cache and {gib(budget.kv_bytes)} of KV, the module leaves "
        f"{gib(module.available_bytes)} (JetPack, the OS and the CUDA runtime assumed to take "
        f"{gib(module.system_bytes + CUDA_RUNTIME_BYTES)} of {gib(module.memory_bytes)}): {gib(missing)} missing{hint}",
        field="device",
        value=module.name,
        mentions=("context",),
    )


def gib(count: int) -> str:
    """Bytes for a reader: GiB above one, else MiB, else KiB."""
    if abs(count) >= GIB:
        return f"{count / GIB:.2f} GiB"
    if abs(count) >= MIB:
        return f"{count / MIB:.1f} MiB"
    return f"{count / 1024:.1f} KiB"
