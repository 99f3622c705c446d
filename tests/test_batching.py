"""Continuous batching: every request gets what it would get alone.

The reference is the same decoder run one sequence at a time (``LanguageModel.generate``, the
solo path every other test checks against Hugging Face): at every step a batched request's
logits are within FP32 tolerance of its solo run's, its greedy answer on the demo model is the
same, its seeded sampling the same, while other requests of other prompt lengths join and leave.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from ccra_export.core import shapes
from ccra_export.core.errors import ConfigError
from ccra_export.runtime.batching import BatcherClosed, ContinuousBatcher, plan_slots
from ccra_export.runtime.language_model import KVPool, LanguageModel, Sampling
from ccra_export.runtime.vlm_pipeline import LM_DIR, Pipeline

#: FP32 decoders: the batched call sums the same products per row as the solo one (measured: equal)
ATOL = 1e-4


@dataclass
class Recording(Sampling):
    """Sampling that keeps the logits of every step it chose from."""

    seen: list[np.ndarray] = field(default_factory=list)

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        self.seen.append(np.array(logits))
        return super().choose(logits, rng)


def sampling(index: int, budget: int) -> Recording:
    """Greedy for even requests, seeded nucleus sampling for odd ones."""
    if index % 2:
        return Recording(max_new_tokens=budget, temperature=0.8, top_p=0.9, seed=100 + index)
    return Recording(max_new_tokens=budget)


@pytest.fixture(scope="module")
def lm(fp32_bundle) -> LanguageModel:
    return LanguageModel(fp32_bundle / LM_DIR)


def prompts(lm: LanguageModel, lengths: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    vocab = len(lm._table) if lm._table is not None else 100
    return [lm.embed(rng.integers(3, vocab, n).tolist()) for n in lengths]


def submit_together(batcher: ContinuousBatcher, fed: list[np.ndarray], samplings: list[Sampling]) -> list:
    """Queue every prompt before the batcher's loop looks (it waits on the condition the test
    holds), each in a free slot released at its end: they are admitted, and decoded, together."""
    futures = []
    with batcher._wake:
        for prompt, chosen in zip(fed, samplings, strict=True):
            cache = batcher.pool.acquire(timeout=0)
            assert cache is not None, "more prompts than free slots"
            future = batcher.submit(cache, prompt, chosen)
            future.add_done_callback(lambda _, cache=cache: cache.release())
            futures.append(future)
    return futures


def test_batched_logits_match_solo_at_every_step_as_requests_join_and_leave(lm):
    """Five requests of prompt lengths 3..40 and budgets 4..12 through three slots: later ones
    join when earlier ones leave, two more join while the first runs."""
    lengths, budgets = [5, 17, 3, 40, 9], [12, 4, 9, 6, 10]
    fed = prompts(lm, lengths)
    solo = []
    for index, (prompt, budget) in enumerate(zip(fed, budgets, strict=True)):
        record = sampling(index, budget)
        solo.append((lm.generate(prompt, record).tokens, record.seen))

    batcher = ContinuousBatcher(lm, KVPool(lm, 3))
    try:
        records = [sampling(index, budget) for index, budget in enumerate(budgets)]
        first_tokens = threading.Event()
        caches = [batcher.pool.acquire(timeout=5)]
        futures = [batcher.submit(caches[0], fed[0], records[0], on_token=lambda _: first_tokens.set())]
        assert first_tokens.wait(30)  # the first is decoding: the others join it mid-flight
        futures += submit_together(batcher, fed[1:3], records[1:3])
        for index in range(3, 5):
            cache = batcher.pool.acquire(timeout=60)  # the 4th and 5th wait for a slot to come free
            assert cache is not None
            caches.append(cache)
            future = batcher.submit(cache, fed[index], records[index])
            future.add_done_callback(lambda _, cache=cache: cache.release())
            futures.append(future)
        generations = [future.result(timeout=60) for future in futures]
    finally:
        batcher.close()
    assert batcher.batched_tokens > batcher.steps  # some steps really decoded several sequences
    for (tokens, logits), generation, record in zip(solo, generations, records, strict=True):
        assert generation.tokens == tokens
        assert len(record.seen) == len(logits)
        for step, (ours, alone) in enumerate(zip(record.seen, logits, strict=True)):
            np.testing.assert_allclose(ours, alone, atol=ATOL, rtol=0, err_msg=f"step {step}")


def test_a_held_slot_is_untouched_by_the_batch_around_it(fp32_bundle, cat):
    """A conversation waiting in slot 0 between turns while others decode over rows 0..2 (a
    dummy token is written past its content): its second turn is the solo conversation's."""
    pipeline = Pipeline.from_bundle(fp32_bundle)
    alone = pipeline.chat()
    want = [alone.ask(q, cat if i == 0 else None, Sampling(max_new_tokens=6)).text for i, q in enumerate(QUESTIONS)]

    batcher = ContinuousBatcher(pipeline.lm, KVPool(pipeline.lm, 3))
    try:
        held = pipeline.chat(batcher.pool.acquire(), batcher)
        got = [held.ask(QUESTIONS[0], cat, Sampling(max_new_tokens=6)).text]
        assert held.cache.slot == 0
        embeds = pipeline.prepare(cat, "What is this?").inputs_embeds
        others = submit_together(batcher, [embeds, embeds], [Sampling(max_new_tokens=20) for _ in range(2)])
        for other in others:
            other.result(60)
        assert batcher.batched_tokens > batcher.steps  # rows 0..2 decoded together, slot 0 among them
        got.append(held.ask(QUESTIONS[1], None, Sampling(max_new_tokens=6)).text)
    finally:
        batcher.close()
    assert got == want


QUESTIONS = ("What is in the picture?", "And its colour?")


def test_demo_answers_batched_are_the_answers_alone(demo_fp32_bundle):
    """The demo model's greedy answers to eight held-out questions, four slots at once, are its
    answers one at a time (and right)."""
    pipeline = Pipeline.from_bundle(demo_fp32_bundle)
    items = shapes.held_out(4, 4242, per_image=2)

    def budget() -> Sampling:
        return Sampling(max_new_tokens=8, stop_ids=pipeline.lm.eos_ids)

    alone = [pipeline.chat().ask(q.question, shapes.render(s), budget()).text.strip() for s, q in items]
    batcher = ContinuousBatcher(pipeline.lm, KVPool(pipeline.lm, 4))
    try:
        prepared = [pipeline.prepare(shapes.render(s), q.question).inputs_embeds for s, q in items]
        generations = []
        for start in (0, 4):  # four slots: two rounds of four requests arriving together
            round_ = submit_together(batcher, prepared[start : start + 4], [budget() for _ in range(4)])
            generations += [future.result(120) for future in round_]
    finally:
        batcher.close()
    eos = pipeline.lm.eos_ids
    together = [pipeline.tokenizer.decode([t for t in g.tokens if t not in eos]).strip() for g in generations]
    assert together == alone
    assert np.mean([a == q.answer for a, (_, q) in zip(alone, items, strict=True)]) >= 0.75
    assert batcher.batched_tokens > batcher.steps


def test_a_stopped_sequence_leaves_and_the_others_go_on(lm):
    """A callback that raises ends its own sequence only (a client gone, a stop string)."""
    fed = prompts(lm, [6, 11])
    want = lm.generate(fed[1], Sampling(max_new_tokens=10)).tokens

    class Gone(Exception):
        pass

    def leave(_: int) -> None:
        raise Gone

    batcher = ContinuousBatcher(lm, KVPool(lm, 2))
    try:
        one, two = batcher.pool.acquire(), batcher.pool.acquire()
        stopped = batcher.submit(one, fed[0], Sampling(max_new_tokens=10), on_token=leave)
        kept = batcher.submit(two, fed[1], Sampling(max_new_tokens=10))
        with pytest.raises(Gone):
            stopped.result(30)
        assert kept.result(30).tokens == want
    finally:
        batcher.close()


def test_generate_many_is_the_python_api_for_batched_generation(lm):
    fed = prompts(lm, [4, 9, 2, 15, 6])
    budgets = [Sampling(max_new_tokens=n) for n in (3, 7, 5, 2, 6)]
    want = [lm.generate(p, s).tokens for p, s in zip(fed, budgets, strict=True)]
    batcher = ContinuousBatcher(lm, KVPool(lm, 2))  # fewer slots than prompts: they take turns
    try:
        got = [g.tokens for g in batcher.generate_many(fed, budgets, timeout=60)]
    finally:
        batcher.close()
    assert got == want
    assert len(batcher.pool._free) == 2  # every slot came back


def test_slot_plan_follows_the_memory_and_refuses_what_cannot_fit(lm):
    slot = lm.kv_slot_bytes()
    assert slot == 2 * lm.layers * lm.kv_heads * lm.context_length * lm.head_size * 4
    assert slot == KVPool(lm, 1).slot_bytes == lm.new_cache().nbytes

    def plan(parallel, held=0, available=None):
        return plan_slots(slot, lm.context_length, parallel, held, available)

    assert plan(None, available=10 * slot).parallel == 4  # capped
    assert plan(None, available=5 * slot).parallel == 2  # half the memory
    assert plan(None, available=slot).parallel == 1
    assert plan(None, held=6 * slot, available=10 * slot).parallel == 2  # held conversations' bytes come first
    assert plan(None).parallel == 4 and "not known" in plan(None).why
    with pytest.raises(ConfigError, match="at most 4 fit") as refused:
        plan(5, available=4 * slot + 5)
    assert refused.value.field == "parallel"
    with pytest.raises(ConfigError, match="one KV slot takes") as refused:
        plan(None, available=slot - 1)
    assert refused.value.field == "context"
    with pytest.raises(ConfigError, match="kept for held conversations"):
        plan(1, held=slot, available=slot + 5)


def test_a_suspended_conversation_holds_its_tokens_not_a_slot(fp32_bundle, cat):
    """Between turns the cached tokens leave the pool (its one slot serves another request
    meanwhile); resumed in another slot, the second turn is the never-suspended one's."""
    pipeline = Pipeline.from_bundle(fp32_bundle)
    alone = pipeline.chat()
    budget = [Sampling(max_new_tokens=6) for _ in QUESTIONS]
    want = [alone.ask(q, cat if i == 0 else None, budget[i]).text for i, q in enumerate(QUESTIONS)]

    batcher = ContinuousBatcher(pipeline.lm, KVPool(pipeline.lm, 2))
    try:
        held = pipeline.chat(batcher.pool.acquire(), batcher)
        got = [held.ask(QUESTIONS[0], cat, Sampling(max_new_tokens=6)).text]
        used = held.tokens_used
        held.suspend()
        assert held.suspended and held.tokens_used == used and len(batcher.pool._free) == 2
        assert held.held_bytes == (used - 1) * batcher.pool.token_bytes  # the tokens, not the context
        other = pipeline.chat(batcher.pool.acquire(), batcher)  # slot 0 again: overwritten by someone else
        assert other.cache.slot == 0
        other.ask("What is this?", cat, Sampling(max_new_tokens=20))
        held.resume(batcher.pool.acquire())
        assert held.cache.slot == 1
        got.append(held.ask(QUESTIONS[1], None, Sampling(max_new_tokens=6)).text)
    finally:
        batcher.close()
    assert got == want


def test_device_row_copies_move_a_slot_exactly(lm):
    """The GPU path of save/restore (an Identity graph bound by address), run on the CPU provider:
    a slot's rows copied out and into another slot come back bit for bit."""
    pool = KVPool(lm, 2)
    source, target = pool.acquire(), pool.acquire()
    source.step(prompts(lm, [9])[0])
    copier = pool._device_copy()
    rows = [copier.new_row() for _ in pool._buffers]
    for buffer, row in zip(pool._buffers, rows, strict=True):
        copier.copy(buffer.data_ptr() + source.slot * pool.row_bytes, row.data_ptr())
    for buffer, row in zip(pool._buffers, rows, strict=True):
        copier.copy(row.data_ptr(), buffer.data_ptr() + target.slot * pool.row_bytes)
    for view in pool._host_views():
        np.testing.assert_array_equal(view[target.slot, :, :9], view[source.slot, :, :9])
        assert np.abs(view[source.slot, :, :9]).max() > 0


def test_one_requests_mistake_stays_its_own(lm):
    """A prompt of the wrong shape or a budget past the context is refused at submit; a loop that
    dies fails every future instead of leaving them pending."""
    from ccra_export.runtime.inputs import InputError

    batcher = ContinuousBatcher(lm, KVPool(lm, 2, context=32))
    try:
        cache = batcher.pool.acquire()
        with pytest.raises(InputError, match="expected \\[1, tokens, hidden\\]"):
            batcher.submit(cache, np.zeros((2, 3, 4), np.float32), Sampling())
        with pytest.raises(InputError, match="leave room for 23 new tokens"):
            batcher.submit(cache, prompts(lm, [10])[0], Sampling(max_new_tokens=40))
        fine = batcher.submit(cache, prompts(lm, [10])[0], Sampling(max_new_tokens=23))
        assert len(fine.result(30).tokens) == 23
    finally:
        batcher.close()

    broken = ContinuousBatcher(lm, KVPool(lm, 2))
    broken._admit = None  # a bug in the loop: calling it raises TypeError
    future = broken.submit(broken.pool.acquire(), prompts(lm, [3])[0], Sampling(max_new_tokens=2))
    with pytest.raises(BatcherClosed, match="TypeError"):
        future.result(30)
    with pytest.raises(BatcherClosed):
        broken.submit(broken.pool.acquire(), prompts(lm, [3])[0], Sampling(max_new_tokens=2))


def test_a_shorter_context_allocates_smaller_slots(fp32_bundle):
    lm = LanguageModel(fp32_bundle / LM_DIR, context=64)
    assert lm.context_length == 64 and lm.new_cache().capacity == 64
    assert lm.kv_slot_bytes() == 2 * lm.layers * lm.kv_heads * 64 * lm.head_size * 4
    with pytest.raises(Exception, match=r"expected 1\.\.2048"):
        LanguageModel(fp32_bundle / LM_DIR, context=4096)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--parallel", "0"], "Invalid value for '--parallel': 0 is not in the range"),
        (["--context", "4096"], "--context: a context of 4096 tokens; the bundle serves at most 2048"),
        (["--parallel", "256"], "--parallel: 256 requests at once need"),
        (["--parallel", "100"], None),  # fits: loading starts (stopped here by the test)
    ],
)
def test_serve_refuses_slots_that_cannot_be_served_before_loading(fp32_bundle, args, said, monkeypatch):
    """One line, exit 2, from the bundle's files alone (the pipeline is never loaded); what fits
    goes on to load."""
    from click.testing import CliRunner

    from ccra_export.cli import main
    from ccra_export.runtime import batching
    from ccra_export.workflows.doctor import bundle_footprint

    slot = LanguageModel(fp32_bundle / LM_DIR).kv_slot_bytes()
    fixed = bundle_footprint(fp32_bundle).fixed_bytes  # weights, tower cache, the runtime's recorded overhead
    # room for 100 slots once the bundle and 1 GiB of held conversations are in
    monkeypatch.setattr(batching, "available_memory", lambda: 100 * slot + fixed + (1 << 30))

    class Loading(Exception):
        pass

    def load(*args, **kwargs):
        raise Loading

    monkeypatch.setattr("ccra_export.runtime.vlm_pipeline.Pipeline.from_bundle", load)
    result = CliRunner().invoke(
        main, ["serve", "--bundle", str(fp32_bundle), "--held-conversations-mib", "1024", *args]
    )
    if said is None:
        assert isinstance(result.exception, Loading), result.output
        return
    assert result.exit_code == 2, result.output
    assert said in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith(("error", "Error"))]) == 1


def test_the_server_batches_concurrent_requests_and_each_gets_its_answer_alone(demo_fp32_bundle):
    """Eight clients at once on a server with four slots (official openai client): each answer
    is the one the pipeline gives that request alone. (Whether two short answers overlap in one
    step depends on timing here; the runtime tests above force and check the batching itself.)"""
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from ccra_export.serve.openai.api_server import ServerSettings
    from tests.servers import running

    pipeline = Pipeline.from_bundle(demo_fp32_bundle)
    items = shapes.held_out(4, 99, per_image=2)

    def url(scene: shapes.Scene) -> str:
        buffer = io.BytesIO()
        shapes.render(scene).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    alone = [
        pipeline.chat().ask(q.question, shapes.render(s), Sampling(max_new_tokens=12, stop_ids=pipeline.lm.eos_ids))
        for s, q in items
    ]
    with running(pipeline, ServerSettings(parallel=4, max_queue=16)) as (base, app, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(item: tuple[shapes.Scene, shapes.Question]) -> str:
            scene, question = item
            content = [
                {"type": "text", "text": question.question},
                {"type": "image_url", "image_url": {"url": url(scene)}},
            ]
            reply = client.chat.completions.create(
                model="ccra", messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0
            )
            return reply.choices[0].message.content

        with ThreadPoolExecutor(8) as clients:
            answers = list(clients.map(ask, items, timeout=300))
        assert app.state.openai_serving_chat.parallel == 4
    assert answers == [reply.text for reply in alone]
