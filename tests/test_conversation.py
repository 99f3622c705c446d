"""Multi-turn chat: the KV cache kept between turns, checked against Hugging Face given the whole
conversation, and the loop that never copies the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.image_preprocess import ImageProcessorConfig, preprocess
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.runtime.conversation import FOLLOW_UP
from ccra_export.runtime.inputs import InputError
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import TEMPLATE, Pipeline
from tests.test_generation import PROMPT

FOLLOW_UP_QUESTION = "And what colour is it?"
IMAGE_TOKEN_ID = 127


def hf_continue(hf_llava, token_ids, image, steps):
    """Hugging Face's LlavaForConditionalGeneration on the whole conversation so far: its own image
    features in place of ``<image>``, then greedy generate. (Embeddings rather than input_ids: a
    random model may itself answer with the ``<image>`` id, which Llava's input_ids path rejects.)"""
    position = token_ids.index(IMAGE_TOKEN_ID)
    pixels = torch.from_numpy(preprocess(image, ImageProcessorConfig.for_image_size(56))[None])
    table = hf_llava.get_input_embeddings().weight
    hf_llava.generation_config.eos_token_id = None
    with torch.no_grad():
        features = hf_llava.get_image_features(pixel_values=pixels)
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        visual = torch.cat(list(features), dim=0)[None] if isinstance(features, (list, tuple)) else features
        embeds = torch.cat(
            [
                table[token_ids[:position]][None],
                visual.reshape(1, -1, table.shape[1]),
                table[token_ids[position + 1 :]][None],
            ],
            dim=1,
        )
        logits = hf_llava(inputs_embeds=embeds).logits[0, -1].numpy()
        out = hf_llava.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, -steps:].tolist(), logits


def test_second_turn_reproduces_hf_given_the_whole_conversation(fp32_bundle, hf_llava, cat):
    pipeline = Pipeline.from_bundle(fp32_bundle)
    chat = pipeline.chat()
    first = chat.ask(PROMPT, cat, Sampling(max_new_tokens=6))
    second = chat.ask(FOLLOW_UP_QUESTION, None, Sampling(max_new_tokens=12))
    history = chat.token_ids[: -len(second.generation.tokens)]  # what the second answer was conditioned on
    # the conversation is LLaVA-1.5's template: turn 1, its answer, </s>, then the follow-up
    eos = pipeline.tokenizer.token_to_id("</s>")
    follow_up = pipeline.encode_text(FOLLOW_UP.format(prompt=FOLLOW_UP_QUESTION))
    opening = pipeline.tokenizer.encode(TEMPLATE.format(prompt=PROMPT)).ids
    assert history == [*opening, *first.generation.tokens, eos, *follow_up]
    want, want_logits = hf_continue(hf_llava, history, cat, 12)
    assert second.generation.tokens == want  # 12 identical greedy tokens in the second turn
    logits = compare_output("logits", second.generation.first_logits, want_logits, thresholds_for("fp32"))
    assert logits.passed, logits.failures
    # the follow-up prefilled only its own tokens: the end of answer 1 (its last token), </s>, the question
    assert second.prompt_tokens == 1 + 1 + len(follow_up) and second.visual_tokens == 0
    # turn 1 fed its prompt and 5 of its 6 tokens (the 6th opens turn 2); turn 2 likewise 11 of 12
    assert chat.cache.length == first.prompt_tokens + 5 + second.prompt_tokens + 11


def test_the_cache_is_written_in_place(fp32_bundle, cat):
    pipeline = Pipeline.from_bundle(fp32_bundle)
    chat = pipeline.chat()
    before = [buffer.data_ptr() for buffer in chat.cache.pool._buffers]
    chat.ask(PROMPT, cat, Sampling(max_new_tokens=4))
    chat.ask(FOLLOW_UP_QUESTION, None, Sampling(max_new_tokens=4))
    presents = chat.cache._binding.get_outputs()[: len(before)]
    assert [p.data_ptr() for p in presents] == before  # present_* are the past buffers: nothing was copied
    assert [buffer.data_ptr() for buffer in chat.cache.pool._buffers] == before
    layers, heads, head = pipeline.lm.layers, pipeline.lm.kv_heads, pipeline.lm.head_size
    assert chat.cache.nbytes == 2 * layers * heads * pipeline.lm.context_length * head * 4


def test_single_turn_generate_equals_the_first_turn_of_a_chat(fp32_bundle, cat):
    pipeline = Pipeline.from_bundle(fp32_bundle)
    _, generation, _ = pipeline.generate_tokens(cat, PROMPT, Sampling(max_new_tokens=10))
    assert pipeline.chat().ask(PROMPT, cat, Sampling(max_new_tokens=10)).generation.tokens == generation.tokens


def test_conversation_refusals(fp32_bundle, cat):
    pipeline = Pipeline.from_bundle(fp32_bundle)
    chat = pipeline.chat()
    with pytest.raises(InputError, match="the first turn of a conversation needs the image"):
        chat.ask(PROMPT)
    chat.ask(PROMPT, cat, Sampling(max_new_tokens=4))
    with pytest.raises(InputError, match="a conversation has one image, given in its first turn"):
        chat.ask(FOLLOW_UP_QUESTION, cat)
    room = chat.cache.capacity - chat.tokens_used
    with pytest.raises(InputError, match=r"the conversation holds \d+ tokens; .* exceed the context of 2048"):
        chat.ask(FOLLOW_UP_QUESTION, None, Sampling(max_new_tokens=room))
    # a refused turn leaves the conversation usable
    assert chat.ask(FOLLOW_UP_QUESTION, None, Sampling(max_new_tokens=3)).generation.tokens


def test_run_interactive_chats_about_one_image(fp32_bundle, tmp_path, cat):
    cat.save(tmp_path / "cat.jpg")
    args = ["run", "--bundle", str(fp32_bundle), "--image", str(tmp_path / "cat.jpg"), "--max-new-tokens", "5"]
    result = CliRunner().invoke(main, [*args, "-i"], input=f"{PROMPT}\n{FOLLOW_UP_QUESTION}\n\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("prompt tokens") == 2
    assert "(16 visual)" in result.stderr and "(0 visual)" in result.stderr
    # the answers are the conversation's, greedy: the same as the Python API's
    pipeline = Pipeline.from_bundle(fp32_bundle)
    chat = pipeline.chat()
    sampling = {"max_new_tokens": 5, "stop_ids": pipeline.lm.eos_ids}
    answers = [
        chat.ask(PROMPT, tmp_path / "cat.jpg", Sampling(**sampling)).text,  # the JPEG the CLI read
        chat.ask(FOLLOW_UP_QUESTION, None, Sampling(**sampling)).text,
    ]
    assert result.stdout == "".join(f"{a}\n" for a in answers)
    no_prompt = CliRunner().invoke(main, args)
    assert no_prompt.exit_code == 2 and "--prompt: missing" in no_prompt.stderr


def test_embeddings_of_a_follow_up_are_the_tables_rows(fp32_bundle):
    pipeline = Pipeline.from_bundle(fp32_bundle)
    ids = pipeline.encode_text(FOLLOW_UP.format(prompt=FOLLOW_UP_QUESTION))
    assert ids and pipeline.tokenizer.token_to_id("<s>") not in ids  # no BOS inside a conversation
    np.testing.assert_array_equal(pipeline.lm.embed(ids)[0, 0], pipeline.lm.embed([ids[0]])[0, 0])
