"""Shared fixtures: tiny random Hugging Face LLaVA checkpoints made in-process (no hub access)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ccra_export.core.config import preset


def make_hf_llava(seed: int = 0):
    """A tiny ``LlavaForConditionalGeneration`` whose vision sizes are the ``tiny`` preset's."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from ccra_export.model.vision_model import hf_vision_config

    tiny = preset("tiny")
    vision = hf_vision_config(tiny)
    text = LlamaConfig(
        hidden_size=tiny.lm_hidden_size,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=6,  # head size 16: ONNX Runtime's CPU GroupQueryAttention needs a multiple of 16
        num_key_value_heads=2,
        vocab_size=128,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=127, image_seq_length=tiny.num_patches
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF init leaves LayerNorms at identity: perturb so the check sees them
        for name, param in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def save_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer trained in-process: 127 tokens + ``<image>`` = 127 (image_token_index)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=127,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60],
    )
    corpus = ["USER: describe the image in detail. ASSISTANT: a cat sits on a red mat near the window."] * 50
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens(["<image>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tokenizer.token_to_id("<image>") == 127 and tokenizer.get_vocab_size() == 128
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(directory)


@pytest.fixture(scope="session")
def hf_llava():
    return make_hf_llava()


@pytest.fixture(scope="session")
def plain_checkpoint(tmp_path_factory, hf_llava) -> Path:
    """A plain LLaVA-1.5 checkpoint directory as ``save_pretrained`` writes it."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    hf_llava.save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def ccra_checkpoint(tmp_path_factory, plain_checkpoint) -> Path:
    """The same checkpoint plus ``ccra.safetensors`` with seeded random CCRA weights."""
    from ccra_export.model.checkpoint import save_ccra_weights
    from ccra_export.model.vision_model import build_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny-ccra-llava"
    shutil.copytree(plain_checkpoint, path)
    save_ccra_weights(build_model(preset("tiny"), seed=7), path)
    return path


@pytest.fixture
def checkpoint_copy(tmp_path, ccra_checkpoint) -> Path:
    """A writable copy to corrupt in error tests."""
    path = tmp_path / "ckpt"
    shutil.copytree(ccra_checkpoint, path)
    return path


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory, plain_checkpoint):
    """The plain checkpoint with its FP32 language model: Hugging Face's LLaVA is the reference."""
    from tests.bundles import build

    return build(tmp_path_factory.mktemp("gen") / "b", plain_checkpoint, "fp32")


@pytest.fixture(scope="session")
def ccra_bundle(tmp_path_factory, ccra_checkpoint):
    """The CCRA checkpoint with its FP32 language model."""
    from tests.bundles import build

    return build(tmp_path_factory.mktemp("gen") / "ccra", ccra_checkpoint, "fp32")


@pytest.fixture(scope="session")
def cat():
    """A real photo (scikit-image's bundled chelsea), not square."""
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.chelsea()).convert("RGB")


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The README's main job: the shipped demo, FP16 vision and an INT4 language model."""
    from tests.bundles import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "fp16-int4", "fp16", "int4")


@pytest.fixture(scope="session")
def demo_fp32_bundle(tmp_path_factory):
    """The shipped demo at FP32 throughout: its answers must be PyTorch's."""
    from tests.bundles import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "fp32", "fp32", "fp32")


class Bundles:
    """Each distinct ``ccra-export build`` argument list built once per test session, through the CLI
    as users do, so test modules share bundles instead of each exporting its own. A test that
    changes a bundle copies it first."""

    def __init__(self, root: Path) -> None:
        self.root, self._built = root, {}

    def __call__(self, *args: str | Path) -> Path:
        from click.testing import CliRunner

        from ccra_export.cli import main

        key = tuple(str(arg) for arg in args)
        if key not in self._built:
            out = self.root / f"bundle-{len(self._built)}"
            result = CliRunner().invoke(main, ["build", *key, "--output", str(out)])
            assert result.exit_code == 0, result.output
            self._built[key] = out
        return self._built[key]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> Bundles:
    return Bundles(tmp_path_factory.mktemp("bundles"))


#: a tiny random CCRA bundle without a language model (split vision, the default), FP32
TINY_FP32 = ("--model", "tiny", "--random-weights", "--precision", "fp32", "--seed", "3")
