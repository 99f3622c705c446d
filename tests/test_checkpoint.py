"""Loading local Hugging Face LLaVA-1.5 checkpoints (+ ccra.safetensors), and refusing bad ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ccra_export.core.config import preset
from ccra_export.core.errors import CheckpointError
from ccra_export.model.checkpoint import CCRA_WEIGHTS, load_checkpoint, save_ccra_weights
from ccra_export.model.vision_model import build_model


def hf_image_features(hf_llava, pixel_values: torch.Tensor) -> np.ndarray:
    """Hugging Face's own LLaVA vision path: tower, feature layer -2, CLS dropped, projector."""
    with torch.no_grad():
        features = hf_llava.model.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(features)).numpy()


def test_plain_checkpoint_reproduces_hf_llava_vision_path(plain_checkpoint, hf_llava):
    loaded = load_checkpoint(plain_checkpoint)
    assert loaded.config.variant == "plain"
    assert loaded.config.tower_layers_needed == 3  # layer 4 of 4 is never read (feature layer -2)
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.model(pixels).numpy()
    np.testing.assert_allclose(ours, hf_image_features(hf_llava, pixels), rtol=1e-5, atol=1e-6)


def test_ccra_checkpoint_loads_the_saved_module(ccra_checkpoint):
    loaded = load_checkpoint(ccra_checkpoint)
    assert loaded.config.variant == "ccra"
    assert loaded.config.ccra == preset("tiny").ccra
    original = build_model(preset("tiny"), seed=7).ccra.state_dict()
    for name, tensor in loaded.model.ccra.state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0)


def test_weights_hash_is_stable_and_content_addressed(checkpoint_copy):
    first = load_checkpoint(checkpoint_copy).weights_sha256
    assert load_checkpoint(checkpoint_copy).weights_sha256 == first
    model = build_model(preset("tiny"), seed=8)  # different CCRA weights, same names and shapes
    save_ccra_weights(model, checkpoint_copy)
    assert load_checkpoint(checkpoint_copy).weights_sha256 != first


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, hf_llava, ccra_checkpoint):
    sharded = tmp_path / "sharded"
    hf_llava.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    shutil.copy(ccra_checkpoint / CCRA_WEIGHTS, sharded / CCRA_WEIGHTS)
    a, b = load_checkpoint(sharded), load_checkpoint(ccra_checkpoint)
    assert a.weights_sha256 == b.weights_sha256
    assert a.token_embeddings().shape == (128, 96)


def _corrupt_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        (config[section] if field else config)[field or section] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: shutil.rmtree(p), "not a directory"),
        (lambda p: (p / "config.json").unlink(), "config.json: missing"),
        (lambda p: (p / "config.json").write_text("{not json"), "config.json: not valid JSON"),
        (lambda p: _corrupt_config(p, model_type="llama"), "expected 'llava'"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x10\x00"), "model.safetensors: not a readable safetensors"),
        (lambda p: (p / "model.safetensors").unlink(), "no *.safetensors weights"),
        (lambda p: _corrupt_config(p, image_seq_length=576), "image_seq_length 576 disagrees"),
        (lambda p: _corrupt_config(p, vision_config__image_size=70), "image_seq_length 16 disagrees"),
        (
            lambda p: _corrupt_config(p, vision_config__image_size=70, image_seq_length=25),
            "does not match the checkpoint",
        ),
        (lambda p: _corrupt_config(p, vision_config__image_size=60), "multiple of patch_size"),
        (lambda p: (p / CCRA_WEIGHTS).write_bytes(b"garbage"), "ccra.safetensors: not a readable"),
    ],
)
def test_bad_checkpoints_fail_with_one_line(checkpoint_copy, damage, message):
    damage(checkpoint_copy)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(checkpoint_copy)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_ccra_weights_for_another_layer_count_are_refused(checkpoint_copy):
    other = preset("tiny").ccra.__class__(feature_layers=(1, 2), text_hidden_size=96, attn_dim=32, num_heads=4)
    model = build_model(preset("tiny").with_ccra(other), seed=0)
    save_ccra_weights(model, checkpoint_copy)
    state = load_checkpoint(checkpoint_copy).model.ccra.layer_embed  # config travels with the weights
    assert state.shape == (2, 32)
    # metadata claiming 3 layers over weights made for 2 is a mismatch, reported as one line
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(checkpoint_copy / CCRA_WEIGHTS), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["ccra_config"])
    meta["feature_layers"] = [1, 2, 3]
    save_file(tensors, str(checkpoint_copy / CCRA_WEIGHTS), metadata={"ccra_config": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_checkpoint(checkpoint_copy)
