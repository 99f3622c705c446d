"""Train the demo CCRA-LLaVA on the shapes task, end to end, on a CPU (the shipped checkpoint's recipe).

    # the shipped checkpoint: a first run, then a second end-to-end cycle continuing from it
    python -m ccra_export.demo.train --out out/demo-first
    python -m ccra_export.demo.train --out ccra_export/demo/checkpoint --init out/demo-first \
        --warmup-steps 0 --steps 2500 --seed 1 --lr 5e-4
    python -m ccra_export.demo.train --out /tmp/smoke --smoke                   # a few steps

The model is the product's own: ``model.vision_model.CCRAVisionModel`` (Hugging Face's
``CLIPVisionModel``, the CCRA reconstruction over every tower layer, LLaVA-1.5's projector) and a
Hugging Face ``LlamaForCausalLM``, fed exactly as the runtime feeds a bundle: CLIP preprocessing
(``core.image_preprocess``), LLaVA-1.5's template with the visual tokens spliced at ``<image>``,
the question's own token embeddings as CCRA's text input. A follow-up turn, half of the time,
uses the runtime's multi-turn format, so ``run --interactive`` answers a second question too.

Two stages, both seeded:
1. tower warm-up: the CLIP tower alone learns, from linear probes on its last layer, which
   shape kind and which colour covers each patch, and (pooled over the patches) which colour
   each kind has in the picture, or that it is absent. An image objective only: nothing here
   sees a question, CCRA or its attention map. A plain ViT trained from scratch learns shape
   identity slowly; this stage is where it does (tried here: without it, the end-to-end run
   stalled near 60% with shape questions at chance).
2. end to end: the answer tokens' cross-entropy (the prompt is not a target), the warm-up loss
   kept at a small weight. Nothing trains the LPWCA map toward the asked shape: where it
   localises, it learned to because it helps answer.

The output directory is a standard checkpoint: ``LlavaForConditionalGeneration`` loads it (CCRA
aside), ``ccra.safetensors`` holds the CCRA module, with the tokenizer (byte-level BPE trained on
the task's text), ``preprocessor_config.json`` and ``training_log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ccra_export.core.chat_template import FOLLOW_UP, TEMPLATE
from ccra_export.core.config import CCRAConfig, ModelConfig, VisionTowerConfig
from ccra_export.core.image_preprocess import ImageProcessorConfig, crop_geometry, preprocess
from ccra_export.core.shapes import (
    ANSWERS,
    COLORS,
    KINDS,
    TEMPLATES,
    Question,
    Scene,
    coverage,
    questions,
    random_scene,
    render,
)
from ccra_export.runtime.attention import AttentionMap

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlavaConfig

IMAGE_SIZE, PATCH = 128, 16
GRID = IMAGE_SIZE // PATCH
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def demo_config() -> ModelConfig:
    vision = VisionTowerConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=128, intermediate_size=512, num_layers=6, num_heads=4
    )
    ccra = CCRAConfig(feature_layers=(1, 2, 3, 4, 5, 6), text_hidden_size=128, attn_dim=64, num_heads=4)
    return ModelConfig(name="demo", vision=vision, lm_hidden_size=128, ccra=ccra).validate("demo")


def task_corpus() -> list[str]:
    """Every text the task has, as the runtime writes it (the tokenizer's training corpus)."""
    texts = []
    for template in TEMPLATES.values():
        for kind in KINDS:
            for color in COLORS:
                question = template.format(kind=kind, color=color)
                texts += [TEMPLATE.format(prompt=question), FOLLOW_UP.format(prompt=question)]
    texts += [word for words in ANSWERS.values() for word in words]
    return texts


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE (every byte encodes; each task word becomes one token) with ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1
    )
    tokenizer.train_from_iterator(task_corpus() * 4, trainer)
    tokenizer.add_special_tokens(["<image>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    for word in (w for words in ANSWERS.values() for w in words):
        ids = tokenizer.encode(word, add_special_tokens=False).ids
        assert len(ids) == 1, f"answer {word!r} is {len(ids)} tokens"
    return tokenizer


def hf_configs(config: ModelConfig, tokenizer: Tokenizer) -> tuple[LlamaConfig, LlavaConfig]:
    from transformers import LlamaConfig, LlavaConfig

    from ccra_export.model.vision_model import hf_vision_config

    text = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=config.lm_hidden_size,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,  # head size 32: ONNX Runtime's CPU GroupQueryAttention needs a multiple of 16
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.token_to_id("<s>"),
        eos_token_id=tokenizer.token_to_id("</s>"),
        pad_token_id=tokenizer.token_to_id("<pad>"),
        tie_word_embeddings=False,
    )
    llava = LlavaConfig(
        vision_config=hf_vision_config(config),
        text_config=text,
        image_token_index=tokenizer.token_to_id("<image>"),
        image_seq_length=config.num_patches,
        projector_hidden_act=config.projector_act,
    )
    return text, llava


@dataclass
class Example:
    """One training sequence: a picture's index in the batch, and one or two turns about it."""

    image: int
    turns: list[Question]


class Batcher:
    """Scenes drawn from a seeded generator, preprocessed as the runtime does, turned into tensors."""

    def __init__(self, tokenizer: Tokenizer, processor: ImageProcessorConfig, seed: int) -> None:
        self.tokenizer, self.processor = tokenizer, processor
        self.rng = np.random.default_rng(seed)
        self.image_id = tokenizer.token_to_id("<image>")
        self.eos = tokenizer.token_to_id("</s>")
        self.pad = tokenizer.token_to_id("<pad>")

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def sequence(self, turns: list[Question]) -> tuple[list[int], list[int]]:
        """Token ids and, per position, that token if it is a target (an answer's, ``</s>`` included) else
        -100; the logits one position earlier are trained to predict it."""
        ids: list[int] = []
        targets: list[int] = []
        for index, turn in enumerate(turns):
            prompt = (
                self.encode(TEMPLATE.format(prompt=turn.question), special=True)
                if index == 0
                else self.encode(FOLLOW_UP.format(prompt=turn.question))
            )
            answer = [*self.encode(turn.answer), self.eos]
            ids += prompt + answer
            targets += [-100] * len(prompt) + answer  # the answer's tokens are the targets, at their own positions
        return ids, targets

    def draw(self, images: int, per_image: int, follow_up: float = 0.5) -> tuple[list[Scene], list[Example]]:
        scenes = [random_scene(self.rng) for _ in range(images)]
        examples = []
        for index, scene in enumerate(scenes):
            for _ in range(per_image):
                turns = questions(scene, self.rng, 2 if self.rng.random() < follow_up else 1)
                examples.append(Example(index, turns))
        return scenes, examples

    def pictures(self, scenes: list[Scene]) -> dict[str, torch.Tensor]:
        """Pixel values as the runtime computes them, and the warm-up targets: each patch's
        coverage by each kind and colour, and each kind's colour in the picture (or absent)."""
        pixels = np.stack([preprocess(render(s), self.processor) for s in scenes])
        colors = torch.full((len(scenes), len(KINDS)), len(COLORS))
        for row, scene in enumerate(scenes):
            for shape in scene.shapes:
                colors[row, KINDS.index(shape.kind)] = list(COLORS).index(shape.color)
        return {
            "pixels": torch.from_numpy(pixels),
            "coverage": torch.from_numpy(np.stack([coverage(s, GRID) for s in scenes])),
            "kind_colors": colors,
        }

    def tensors(self, scenes: list[Scene], examples: list[Example]) -> dict[str, torch.Tensor]:
        pictures = self.pictures(scenes)
        sequences = [self.sequence(e.turns) for e in examples]
        instructions = [self.encode(e.turns[0].question) for e in examples]
        length = max(len(ids) for ids, _ in sequences)
        width = max(len(ids) for ids in instructions)
        ids = torch.full((len(examples), length), self.pad)
        targets = torch.full((len(examples), length), -100)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        text = torch.full((len(examples), width), self.pad)
        text_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, ((seq, tgt), inst) in enumerate(zip(sequences, instructions, strict=True)):
            ids[row, : len(seq)] = torch.tensor(seq)
            targets[row, : len(tgt)] = torch.tensor(tgt)
            mask[row, : len(seq)] = 1
            text[row, : len(inst)] = torch.tensor(inst)
            text_mask[row, : len(inst)] = 1
        positions = {seq.index(self.image_id) for seq, _ in sequences}
        assert len(positions) == 1, "the <image> token must sit at one position in every prompt"
        return {
            **pictures,
            "image_index": torch.tensor([e.image for e in examples]),
            "ids": ids,
            "targets": targets,
            "mask": mask,
            "text": text,
            "text_mask": text_mask,
            "image_position": torch.tensor(positions.pop()),
        }


class DemoModel(nn.Module):
    """The product's CCRA vision model + a Llama decoder, with the warm-up probe on the tower."""

    def __init__(self, config: ModelConfig, text_config: LlamaConfig) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        from ccra_export.model.vision_model import CCRAVisionModel

        self.vision = CCRAVisionModel(config)
        self.lm = LlamaForCausalLM(text_config)
        width = config.vision.hidden_size
        self.probe = nn.Linear(width, len(KINDS) + 1 + len(COLORS) + 1)  # per patch: kind or none, colour or none
        self.presence = nn.Linear(width, len(KINDS) * (len(COLORS) + 1))  # pooled: each kind's colour, or absent

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def probe_loss(self, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The warm-up objective on the tower's last layer [B, N, Dv] (nothing of CCRA's)."""
        last = features[:, -1]
        kinds, colors = len(KINDS), len(COLORS)
        cover = batch["coverage"]
        # a patch's label: the kind (colour) covering most of it, "none" when nothing covers half
        none = torch.full_like(cover[..., :1], 0.5)
        kind = torch.cat([none, cover[..., :kinds]], -1).argmax(-1)
        color = torch.cat([none, cover[..., kinds:]], -1).argmax(-1)
        patch = self.probe(last)
        pooled = self.presence(last.mean(1)).reshape(-1, kinds, colors + 1)
        return (
            F.cross_entropy(pooled.reshape(-1, colors + 1), batch["kind_colors"].reshape(-1))
            + F.cross_entropy(patch[..., : kinds + 1].reshape(-1, kinds + 1), kind.reshape(-1))
            + F.cross_entropy(patch[..., kinds + 1 :].reshape(-1, colors + 1), color.reshape(-1))
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(answer loss, probe loss, answer logits at target positions, LPWCA map [B, L, N])."""
        features = self.vision.tower_features(batch["pixels"])  # [images, L, N, Dv]
        per_example = features[batch["image_index"]]
        visual, attention = self.vision.head(per_example, self.embed(batch["text"]), batch["text_mask"])
        embeds = self.embed(batch["ids"])
        p = int(batch["image_position"])
        embeds = torch.cat([embeds[:, :p], visual, embeds[:, p + 1 :]], dim=1)
        n = visual.shape[1]
        mask = torch.cat(
            [batch["mask"][:, :p], torch.ones_like(batch["mask"][:, :1]).expand(-1, n), batch["mask"][:, p + 1 :]], 1
        )
        targets = torch.cat(
            [
                batch["targets"][:, :p],
                torch.full_like(batch["targets"][:, :1], -100).expand(-1, n),
                batch["targets"][:, p + 1 :],
            ],
            1,
        )
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        # position t predicts token t+1: shift targets left by one
        wanted = targets[:, 1:] != -100
        logits = self.lm.lm_head(hidden[:, :-1][wanted])
        loss = F.cross_entropy(logits, targets[:, 1:][wanted])
        return loss, self.probe_loss(features, batch), logits, attention


@torch.no_grad()
def presence_accuracy(model: DemoModel, batcher: Batcher, images: int = 64) -> float:
    """Stage 1's held-out figure: how often the pooled probe names each kind's colour (or absence)."""
    pictures = batcher.pictures(batcher.draw(images, 0)[0])
    last = model.vision.tower_features(pictures["pixels"])[:, -1]
    guess = model.presence(last.mean(1)).reshape(images, len(KINDS), -1).argmax(-1)
    return round(float((guess == pictures["kind_colors"]).float().mean()), 4)


def schedule(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: DemoModel, batcher: Batcher, processor: ImageProcessorConfig, images: int) -> dict[str, float]:
    """First-turn accuracy per template (argmax of the answer's token: answers are one token) and
    the localisation figure on ``What color is the {shape}?``, on a held-out generator."""
    model.eval()
    correct: dict[str, list[bool]] = {t: [] for t in TEMPLATES}
    localised: list[float] = []
    for start in range(0, images, 32):
        scenes, examples = batcher.draw(min(32, images - start), 2, follow_up=0.0)
        batch = batcher.tensors(scenes, examples)
        _, _, logits, attention = model(batch)
        chosen = logits.argmax(-1).reshape(len(examples), 2)[:, 0]  # answer token, then </s>
        for row, example in enumerate(examples):
            turn = example.turns[0]
            correct[turn.template].append(int(chosen[row]) == batcher.encode(turn.answer)[0])
            if turn.template == "color":
                scene = scenes[example.image]
                amap = AttentionMap.from_output(
                    attention[row].numpy(), (1,) * attention.shape[1], crop_geometry((scene.side,) * 2, processor)
                )
                localised.append(amap.share_in_box(turn.box) / amap.box_share(turn.box))
    model.train()
    figures = {f"acc_{t}": float(np.mean(v)) for t, v in correct.items() if v}
    figures["acc"] = float(np.mean([x for v in correct.values() for x in v]))
    figures["localised_3x"] = float(np.mean(np.asarray(localised) >= 3.0)) if localised else 0.0
    figures["box_ratio_median"] = float(np.median(localised)) if localised else 0.0
    return figures


def save(
    model: DemoModel, llava_config: LlavaConfig, tokenizer: Tokenizer, processor: ImageProcessorConfig, out: Path
) -> None:
    """A Hugging Face LLaVA checkpoint + ``ccra.safetensors``; checked by reloading through the product."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from ccra_export.model.checkpoint import load_checkpoint, save_ccra_weights

    hf = LlavaForConditionalGeneration(llava_config).eval()
    hf.model.vision_tower.load_state_dict(model.vision.vision_tower.state_dict())
    hf.model.multi_modal_projector.load_state_dict(model.vision.multi_modal_projector.state_dict())
    hf.model.language_model.load_state_dict(model.lm.model.state_dict())
    hf.lm_head.load_state_dict(model.lm.lm_head.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    save_ccra_weights(model.vision, out)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": processor.shortest_edge},
        crop_size={"height": processor.crop_height, "width": processor.crop_width},
        image_mean=list(processor.image_mean),
        image_std=list(processor.image_std),
    ).save_pretrained(out)
    loaded = load_checkpoint(out)
    for name, tensor in model.vision.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), f"{name} did not round-trip"


def load_into(model: DemoModel, checkpoint: Path) -> None:
    """Weights of a checkpoint this script wrote (the warm-up probes start afresh: they are not saved)."""
    from transformers import LlavaForConditionalGeneration

    from ccra_export.model.checkpoint import load_checkpoint

    model.vision.load_state_dict(load_checkpoint(checkpoint).model.state_dict())
    llava = LlavaForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.lm.model.load_state_dict(llava.model.language_model.state_dict())
    model.lm.lm_head.load_state_dict(llava.lm_head.state_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the demo CCRA-LLaVA on the shapes task (CPU).")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=1200, help="stage 1: tower warm-up steps")
    parser.add_argument("--steps", type=int, default=2500, help="stage 2: end-to-end steps")
    parser.add_argument("--images", type=int, default=16, help="pictures per step")
    parser.add_argument("--per-image", type=int, default=4, help="sequences per picture")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-images", type=int, default=256, help="held-out pictures per evaluation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument(
        "--init", type=Path, help="continue from this checkpoint (written by this script) instead of random weights"
    )
    parser.add_argument("--smoke", action="store_true", help="a few small steps (the test suite's run)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.warmup_steps, args.steps, args.images, args.per_image = 5, 25, 4, 2
        args.eval_every, args.eval_images = 0, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = demo_config()
    processor = ImageProcessorConfig.for_image_size(IMAGE_SIZE)
    tokenizer = train_tokenizer()
    text_config, llava_config = hf_configs(config, tokenizer)
    model = DemoModel(config, text_config).train()
    if args.init is not None:
        load_into(model, args.init)
    train_data = Batcher(tokenizer, processor, args.seed)
    held_out = Batcher(tokenizer, processor, args.seed + 1000)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "training_log.jsonl").open("w")
    start = time.perf_counter()

    def record(**entry: float) -> None:
        entry = {"elapsed_s": round(time.perf_counter() - start, 1), **entry}
        log.write(json.dumps(entry) + "\n")
        log.flush()
        print(json.dumps(entry), flush=True)

    tower = [*model.vision.vision_tower.parameters(), *model.probe.parameters(), *model.presence.parameters()]
    warm = torch.optim.AdamW(tower, lr=args.lr, weight_decay=0.01)
    for step in range(args.warmup_steps):
        for group in warm.param_groups:
            group["lr"] = schedule(step, args.warmup_steps, max(1, args.warmup_steps // 10), args.lr)
        pictures = train_data.pictures(train_data.draw(args.images * 2, 0)[0])
        loss = model.probe_loss(model.vision.tower_features(pictures["pixels"]), pictures)
        warm.zero_grad()
        loss.backward()
        warm.step()
        if step % 200 == 0 or step == args.warmup_steps - 1:
            accuracy = presence_accuracy(model, held_out)
            record(stage=1, step=step, probe_loss=round(loss.item(), 4), presence_acc=accuracy)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step, args.steps, max(1, args.steps // 20), args.lr)
        batch = train_data.tensors(*train_data.draw(args.images, args.per_image))
        answer_loss, probe_loss, _, _ = model(batch)
        loss = answer_loss + 0.1 * probe_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            record(stage=2, step=step, answer_loss=round(answer_loss.item(), 4), probe_loss=round(probe_loss.item(), 4))
        if args.eval_every and step and step % args.eval_every == 0:
            figures = evaluate(model, held_out, processor, args.eval_images)
            record(stage=2, step=step, **{k: round(v, 4) for k, v in figures.items()})
            save(model.eval(), llava_config, tokenizer, processor, args.out)  # a usable checkpoint at every evaluation
            model.train()
    final = evaluate(model, held_out, processor, args.eval_images)
    record(stage=2, step=args.steps, final=1, **{k: round(v, 4) for k, v in final.items()})
    log.close()
    save(model.eval(), llava_config, tokenizer, processor, args.out)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
