"""Continuous batching: several sequences decoded in one decoder call per step.

Decoding is memory-bound: a step reads every weight once whatever the batch, so feeding one token
of each of N sequences in one call costs little more than one. ``ContinuousBatcher`` owns a
``KVPool`` (one slot per sequence) and a thread that runs the loop llama-server's parallel slots
and vLLM's scheduler run:

1. take waiting work, in arrival order, up to ``PREFILL_TOKENS_PER_STEP`` prompt tokens (at least
   one piece): a prefill (a conversation's replayed history), or a new sequence, whose prompt is
   prefilled alone in its slot (batch 1) and whose first token is chosen;
2. one batched decode step for every running sequence (``KVPool.step``), each choosing its next
   token with its own sampling and random generator;
3. a sequence that stops (a stop id, its token budget, its callback raising) leaves at once, and
   its caller gets the ``Generation`` (or the exception) through a future.

So a new request's prefill joins between two steps and never waits for the others to finish (the
running ones wait at most one step's worth of prefill: llama-server and vLLM bound it the same
way, with a batch of prompt tokens per step), and
each request gets what it would get alone: its logits are those of its own rows (the attention
mask gives each row its own length; tests compare every step with a solo run), its random
generator is its own. Only this thread calls the decoder on the pool, in order; callers block on
futures. No torch: this runs on a Jetson.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ccra_export.core.errors import CCRAExportError, ConfigError
from ccra_export.core.memory_budget import slots_that_fit
from ccra_export.runtime.inputs import InputError
from ccra_export.runtime.language_model import Generation, KVCache, KVPool, LanguageModel, Sampling

LOG = logging.getLogger("ccra_export.runtime.batching")

#: the default number of sequences decoded together when memory allows more: past it, a CPU or an
#: embedded GPU is compute-bound and a larger batch only adds latency (llama-server's default is 4 too)
DEFAULT_PARALLEL_CAP = 4
#: prompt tokens prefilled between two decode steps (at least one request's): short prompts that
#: arrive together start together, a long one delays the running sequences by one prefill at most
PREFILL_TOKENS_PER_STEP = 1024
#: the share of the memory available at start that KV slots chosen by default may take
DEFAULT_KV_SHARE = 0.5


def _prompt(inputs_embeds: np.ndarray) -> np.ndarray:
    """``inputs_embeds`` as a [1, S, D] array with S >= 1, else a one-line refusal."""
    embeds = np.asarray(inputs_embeds)
    if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[1] < 1:
        raise InputError(f"prompt embeddings of shape {embeds.shape}; expected [1, tokens, hidden]", field="prompt")
    return embeds


class BatcherClosed(CCRAExportError):
    """The batcher was shut down before this work ran (a server stopping)."""


@dataclass(frozen=True)
class SlotPlan:
    """How many KV slots a server allocates (``parallel``: requests generating at once) and why."""

    parallel: int
    slot_bytes: int
    why: str


def available_memory() -> int | None:
    """Bytes the kernel says are available (MemAvailable); None where /proc/meminfo is absent."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def kv_memory(device: str, shared: bool) -> int | None:
    """The memory KV slots come from, when it can be known without a GPU library: the host's for
    the CPU and for a Jetson's GPU (it shares the host's memory), None for a discrete GPU."""
    return available_memory() if device == "cpu" or shared else None


def plan_slots(slot_bytes: int, context: int, parallel: int | None, held_bytes: int, available: int | None) -> SlotPlan:
    """The slots for ``parallel`` requests (None: as many as half the ``available`` memory holds,
    at most ``DEFAULT_PARALLEL_CAP``); ``slot_bytes``: one slot at ``context`` tokens; ``held_bytes``:
    the most the conversations held between turns may take. Refused in one line when the memory
    cannot hold the slots and the held conversations (``available`` None: not known, not checked)."""
    mib = 1 << 20
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise ConfigError(f"{parallel!r} requests at once; expected an integer >= 1", field="parallel")
    room = None if available is None else available - max(0, held_bytes)
    fit = None if room is None else slots_that_fit(room, slot_bytes)
    said = "" if not held_bytes else f" once {held_bytes / mib:.0f} MiB are kept for held conversations"
    if fit == 0:
        raise ConfigError(
            f"one KV slot takes {slot_bytes / mib:.0f} MiB at a context of {context} tokens and "
            f"{max(0, room) / mib:.0f} MiB are available{said}: serve a shorter context",
            field="context",
        )
    if parallel is None:
        if room is None:
            parallel, why = DEFAULT_PARALLEL_CAP, f"the default of {DEFAULT_PARALLEL_CAP}: device memory not known"
        else:
            half = slots_that_fit(int(room * DEFAULT_KV_SHARE), slot_bytes)
            parallel = max(1, min(DEFAULT_PARALLEL_CAP, half))
            why = f"{half} fit in half the {room / mib:.0f} MiB available{said}; at most {DEFAULT_PARALLEL_CAP}"
    else:
        why = "asked"
        if fit is not None and parallel > fit:
            raise ConfigError(
                f"{parallel} requests at once need {parallel * slot_bytes / mib:.0f} MiB of KV at a context of "
                f"{context} tokens and {room / mib:.0f} MiB are available{said}: at most {fit} fit",
                field="parallel",
            )
    return SlotPlan(parallel, slot_bytes, why)


@dataclass
class _Prefill:
    cache: KVCache
    embeds: np.ndarray
    future: Future[np.ndarray] = field(default_factory=Future)


@dataclass
class _Sequence:
    cache: KVCache
    embeds: np.ndarray
    sampling: Sampling
    on_token: Callable[[int], None] | None
    future: Future[Generation] = field(default_factory=Future)
    rng: np.random.Generator = field(init=False)
    tokens: list[int] = field(default_factory=list)
    first_logits: np.ndarray | None = None
    started: float = 0.0
    prefill_s: float = 0.0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sampling.seed)

    def accept(self, logits: np.ndarray) -> bool:
        """Choose the next token from ``logits``, hand it to the callback; True when the sequence
        is done (a stop id or its budget). The chosen token is fed by the next step, if any."""
        token = self.sampling.choose(logits, self.rng)
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(token)
        return token in self.sampling.stop_ids or len(self.tokens) >= self.sampling.max_new_tokens

    def result(self) -> Generation:
        assert self.first_logits is not None
        decode_s = time.perf_counter() - self.started - self.prefill_s
        return Generation(self.tokens, self.first_logits, self.prefill_s, decode_s, int(self.embeds.shape[1]))


class ContinuousBatcher:
    """Decodes up to ``pool.slots`` sequences together; ``decode`` and ``prefill`` have
    ``LanguageModel``'s signatures, so a ``Conversation`` runs on either."""

    def __init__(self, lm: LanguageModel, pool: KVPool) -> None:
        if pool.model is not lm:
            raise ValueError("the pool belongs to another language model")
        self.lm, self.pool = lm, pool
        self._waiting: deque[_Prefill | _Sequence] = deque()
        self._running: list[_Sequence] = []
        self._admitting: list[_Prefill | _Sequence] = []
        self._wake = threading.Condition()
        self._closed = False
        self.steps = 0  # batched decode calls so far
        self.batched_tokens = 0  # tokens those calls decoded (their mean batch: batched_tokens / steps)
        self._thread = threading.Thread(target=self._loop, name="ccra-batcher", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        """Sequences decoding now."""
        return len(self._running)

    def submit(
        self,
        cache: KVCache,
        inputs_embeds: np.ndarray,
        sampling: Sampling,
        on_token: Callable[[int], None] | None = None,
    ) -> Future[Generation]:
        """Queue a generation: prefill ``inputs_embeds`` after what ``cache`` holds, then sample
        up to ``sampling.max_new_tokens`` tokens, as ``LanguageModel.decode`` does. ``on_token``
        runs on the batcher's thread; an exception it raises ends this sequence only, and the
        future raises it. A prompt that is not [1, S, D] or that cannot fit with its token budget
        is refused here, so one request's mistake never reaches the shared decoder call."""
        embeds = _prompt(inputs_embeds)
        room = cache.capacity - cache.length - embeds.shape[1]
        if room < sampling.max_new_tokens - 1:  # the last token chosen is not fed
            raise InputError(
                f"{cache.length} cached + {embeds.shape[1]} prompt tokens leave room for {max(room + 1, 0)} new "
                f"tokens in the context of {cache.capacity}, not {sampling.max_new_tokens}",
                field="max_new_tokens",
            )
        return self._put(_Sequence(self._own(cache), embeds, sampling, on_token))

    def decode(
        self,
        cache: KVCache,
        inputs_embeds: np.ndarray,
        sampling: Sampling,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """``submit`` and wait: the caller's thread blocks while the batch runs."""
        return self.submit(cache, inputs_embeds, sampling, on_token).result()

    def prefill(self, cache: KVCache, inputs_embeds: np.ndarray) -> np.ndarray:
        """Feed ``inputs_embeds`` into ``cache`` between two steps; the last position's logits."""
        return self._put(_Prefill(self._own(cache), _prompt(inputs_embeds))).result()

    def generate_many(
        self, prompts: Sequence[np.ndarray], samplings: Sequence[Sampling], timeout: float | None = None
    ) -> list[Generation]:
        """Each [1, S, D] prompt in a fresh slot, all decoded together; the generations in order.
        Waits for free slots when there are more prompts than slots."""
        if len(prompts) != len(samplings):
            raise ValueError(f"{len(prompts)} prompts and {len(samplings)} samplings")
        futures: list[Future[Generation]] = []
        try:
            for prompt, sampling in zip(prompts, samplings, strict=True):
                cache = self.pool.acquire(timeout=timeout)
                if cache is None:
                    raise TimeoutError(f"no KV slot came free in {timeout} s")
                try:
                    future = self.submit(cache, prompt, sampling)
                except BaseException:
                    cache.release()
                    raise
                future.add_done_callback(lambda _, cache=cache: cache.release())  # the slot frees at its end
                futures.append(future)
            return [future.result(timeout) for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()  # those still waiting never start (their slots are released)
            raise

    def close(self) -> None:
        """Stop the loop; waiting and running work fails with ``BatcherClosed``."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:  # a callback closing it cannot wait for itself
            self._thread.join(timeout=30)
        self._fail_all(BatcherClosed("the batcher was closed"))

    def _own(self, cache: KVCache) -> KVCache:
        if cache.pool is not self.pool:
            raise ValueError("the KV cache is not a slot of this batcher's pool")
        return cache

    def _put(self, work: _Prefill | _Sequence) -> Future:
        with self._wake:
            if self._closed or not self._thread.is_alive():
                raise BatcherClosed("the batcher is closed")
            self._waiting.append(work)
            self._wake.notify()
        return work.future

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug, or an interpreter exit: nothing may wait forever on this thread
            with self._wake:
                self._closed = True
            self._fail_all(BatcherClosed(f"the batcher stopped ({type(exc).__name__}: {exc})"))
            if not isinstance(exc, Exception):
                raise
            LOG.exception("the batcher stopped")  # the traceback for whoever runs the process; callers got one line

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running:
                    self._wake.wait()
                if self._closed:
                    break
                admitted = self._admitting = []  # in hand: failed with the rest if the loop dies
                tokens = 0
                while self._waiting and (
                    not admitted or tokens + self._waiting[0].embeds.shape[1] <= PREFILL_TOKENS_PER_STEP
                ):
                    admitted.append(self._waiting.popleft())
                    tokens += admitted[-1].embeds.shape[1]
            for work in admitted:
                self._admit(work)
            if self._running:
                self._step()
        self._fail_all(BatcherClosed("the batcher was closed"))

    def _admit(self, work: _Prefill | _Sequence) -> None:
        """Prefill ``work`` in its slot alone; a new sequence chooses its first token here."""
        if not work.future.set_running_or_notify_cancel():
            return
        if isinstance(work, _Prefill):
            try:
                work.future.set_result(work.cache.step(work.embeds))
            except Exception as exc:
                work.future.set_exception(exc)
            return
        try:
            work.started = time.perf_counter()
            work.first_logits = work.cache.step(work.embeds)
            work.prefill_s = time.perf_counter() - work.started
            done = work.accept(work.first_logits)
        except Exception as exc:
            work.future.set_exception(exc)
            return
        if done:
            work.future.set_result(work.result())
        else:
            self._running.append(work)

    def _step(self) -> None:
        """One token for every running sequence, in one decoder call."""
        running = self._running
        try:
            embeds = self.lm.embed([seq.tokens[-1] for seq in running]).reshape(len(running), 1, -1)
            logits = self.pool.step([seq.cache for seq in running], embeds)
        except Exception as exc:  # the decoder itself failed: every sequence in the call gets it
            for seq in running:
                seq.future.set_exception(exc)
            self._running = []
            return
        self.steps += 1
        self.batched_tokens += len(running)
        still: list[_Sequence] = []
        for seq, row in zip(running, logits, strict=True):
            if seq.future.done():  # failed meanwhile (the batcher closed from a callback)
                continue
            try:
                done = seq.accept(row)
            except Exception as exc:  # the caller's callback stopped it (a stop string, a cancel)
                seq.future.set_exception(exc)
                continue
            if done:
                seq.future.set_result(seq.result())
            else:
                still.append(seq)
        self._running = still

    def _fail_all(self, error: Exception) -> None:
        with self._wake:
            pending = [*self._waiting, *self._admitting, *self._running]
            self._waiting.clear()
            self._running = []
        for work in pending:
            if not work.future.done():
                work.future.set_exception(error)
