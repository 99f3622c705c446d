"""Load the vision half of a local Hugging Face LLaVA-1.5 checkpoint, plus CCRA weights if present.

Layout (README, "Checkpoint layout"):

    CKPT/config.json                     LlavaConfig (model_type "llava", vision_config, text_config)
    CKPT/model*.safetensors [+ .index.json]  Hugging Face weights; only the vision tower, the
                                         projector (and the token embedding table, for parity
                                         inputs) are read, never the language model layers
    CKPT/ccra.safetensors                optional: CCRA weights named as ``CCRA.state_dict()``,
                                         its CCRAConfig as JSON in the metadata key "ccra_config"

Without ``ccra.safetensors`` the checkpoint is plain LLaVA-1.5 and builds the plain variant.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ccra_export.core.config import CCRAConfig, ModelConfig, VisionTowerConfig
from ccra_export.core.errors import CheckpointError, ConfigError
from ccra_export.core.hashing import TensorDigest
from ccra_export.model.vision_model import CCRAVisionModel, build_model

CCRA_WEIGHTS = "ccra.safetensors"
CCRA_CONFIG_KEY = "ccra_config"

# Every published spelling of the LLaVA vision tower / projector prefixes (llava-hf 4.x, 5.x saves).
_TOWER = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(?P<rest>.+)$")
_PROJECTOR = re.compile(r"^(?:model\.)?multi_modal_projector\.(?P<rest>.+)$")
_EMBED_TOKENS = re.compile(r"(?:^|\.)embed_tokens\.weight$")
_ENCODER_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


@dataclass
class LoadedCheckpoint:
    model: CCRAVisionModel
    config: ModelConfig
    path: Path
    weights_sha256: str
    embed_tokens: tuple[Path, str] | None  # (file, tensor name) of the LM token embedding table

    def token_embeddings(self) -> np.ndarray | None:
        """The language model's input embedding table, float32 (for realistic parity inputs)."""
        if self.embed_tokens is None:
            return None
        file, name = self.embed_tokens
        with safe_open(str(file), "pt") as handle:
            return handle.get_tensor(name).float().numpy()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected a Hugging Face LLaVA-1.5 config.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def model_config_from_hf(config_path: Path, ccra: CCRAConfig | None) -> ModelConfig:
    """ModelConfig from a LLaVA config.json, with Hugging Face's defaults for omitted fields."""
    from transformers import LlavaConfig

    raw = _read_json(config_path)
    if raw.get("model_type") != "llava":
        raise CheckpointError(f"{config_path}: model_type is {raw.get('model_type')!r}; expected 'llava' (LLaVA-1.5)")
    try:
        hf = LlavaConfig.from_dict(raw)
    except Exception as exc:  # transformers raises many types for malformed configs
        raise CheckpointError(f"{config_path}: not a valid LlavaConfig ({exc})") from None
    vc = hf.vision_config
    if vc.model_type != "clip_vision_model":
        raise CheckpointError(f"{config_path}: vision_config is {vc.model_type!r}; expected 'clip_vision_model'")
    if not isinstance(hf.vision_feature_layer, int):
        raise CheckpointError(
            f"{config_path}: vision_feature_layer must be one layer index, got {hf.vision_feature_layer}"
        )
    if hf.vision_feature_select_strategy != "default":
        raise CheckpointError(
            f"{config_path}: vision_feature_select_strategy {hf.vision_feature_select_strategy!r} is not "
            "supported; LLaVA-1.5 uses 'default' (CLS dropped)"
        )
    vision = VisionTowerConfig(
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_layers=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads,
        layer_norm_eps=vc.layer_norm_eps,
        hidden_act=vc.hidden_act,
        num_channels=vc.num_channels,
    )
    config = ModelConfig(
        name=config_path.parent.name,
        vision=vision,
        lm_hidden_size=hf.text_config.hidden_size,
        ccra=ccra,
        vision_feature_layer=hf.vision_feature_layer,
        projector_act=hf.projector_hidden_act,
        projector_bias=getattr(hf, "multimodal_projector_bias", True),
    )
    try:
        config.validate(str(config_path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    seq_len = raw.get("image_seq_length")
    if seq_len is not None and seq_len != vision.num_patches:
        raise CheckpointError(
            f"{config_path}: image_seq_length {seq_len} disagrees with vision_config image_size "
            f"{vision.image_size} / patch_size {vision.patch_size} = {vision.num_patches} patches"
        )
    return config


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map object")
        files = sorted({root / name for name in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{missing[0]}: listed in {index.name} but missing")
        return files
    files = sorted(p for p in root.glob("*.safetensors") if p.name != CCRA_WEIGHTS)
    if not files:
        raise CheckpointError(
            f"{root}: no *.safetensors weights; expected Hugging Face LLaVA weights saved with "
            "save_pretrained (PyTorch .bin checkpoints are not read)"
        )
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), "pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _digest_tensor(digest: TensorDigest, name: str, tensor: torch.Tensor) -> None:
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    digest.add(name, str(tensor.dtype), tuple(tensor.shape), raw)


def _read_ccra(root: Path, digest: TensorDigest) -> tuple[CCRAConfig, dict[str, torch.Tensor]] | None:
    path = root / CCRA_WEIGHTS
    if not path.exists():
        return None
    with _open(path) as handle:
        meta = handle.metadata() or {}
        if CCRA_CONFIG_KEY not in meta:
            raise CheckpointError(f"{path}: metadata has no {CCRA_CONFIG_KEY!r} entry (the CCRAConfig as JSON)")
        try:
            fields = json.loads(meta[CCRA_CONFIG_KEY])
            ccra = CCRAConfig(**{**fields, "feature_layers": tuple(fields["feature_layers"])})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: malformed {CCRA_CONFIG_KEY} metadata ({exc})") from None
        tensors = {}
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            _digest_tensor(digest, f"ccra.{name}", tensor)
            tensors[name] = tensor.float()
    return ccra, tensors


def _check_positions(config: ModelConfig, tower: dict[str, torch.Tensor], where: Path) -> None:
    positions = tower.get("embeddings.position_embedding.weight")
    if positions is not None and positions.shape[0] != config.num_patches + 1:
        raise CheckpointError(
            f"{where}/config.json: vision_config image_size {config.vision.image_size} / patch_size "
            f"{config.vision.patch_size} gives {config.num_patches + 1} positions, but the weights have "
            f"{positions.shape[0]}: the config's image size does not match the checkpoint"
        )


def _tower_prefix(model: CCRAVisionModel) -> str:
    """transformers 4.x nests CLIPVisionModel's weights under ``vision_model.``; 5.x does not."""
    return "vision_model." if hasattr(model.vision_tower, "vision_model") else ""


def _load_strict(model: CCRAVisionModel, state: dict[str, torch.Tensor], root: Path) -> None:
    """load_state_dict(strict) with a one-line reason: the first offending names and a count."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            more = f" (+{len(names) - 2} more)" if len(names) > 2 else ""
            shown = [
                f"{n} {tuple(state[n].shape)} vs {tuple(expected[n].shape)}" if label == "wrong shape" else n
                for n in names[:2]
            ]
            problems.append(f"{label}: {', '.join(shown)}{more}")
    if problems:
        raise CheckpointError(f"{root}: weights do not match config.json / ccra_config ({'; '.join(problems)})")
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read config and the vision-side weights; the language model's layers are never loaded."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"--model {root}: not a directory and not a preset name")
    digest = TensorDigest()
    ccra_part = _read_ccra(root, digest)
    config = model_config_from_hf(root / "config.json", ccra_part[0] if ccra_part else None)

    tower: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    embed_tokens = None
    for file in _weight_files(root):
        with _open(file) as handle:
            for name in handle.keys():
                if (match := _TOWER.match(name)) is not None:
                    rest = match["rest"]
                    layer = _ENCODER_LAYER.match(rest)
                    if layer is not None and int(layer[1]) >= config.tower_layers_needed:
                        continue  # layers after the last one read are not part of the graph
                    target, key = tower, rest
                elif (match := _PROJECTOR.match(name)) is not None:
                    target, key = projector, match["rest"]
                else:
                    if _EMBED_TOKENS.search(name):
                        embed_tokens = (file, name)
                    continue
                try:
                    tensor = handle.get_tensor(name)
                except (SafetensorError, OSError) as exc:
                    raise CheckpointError(f"{file}: tensor {name} unreadable ({exc})") from None
                _digest_tensor(digest, name, tensor)
                target[key] = tensor.float()
    if not tower or not projector:
        missing = "vision_tower.*" if not tower else "multi_modal_projector.*"
        raise CheckpointError(f"{root}: no {missing} tensors in the safetensors files; is this a LLaVA checkpoint?")
    _check_positions(config, tower, root)

    model = build_model(config)
    state = {f"vision_tower.{_tower_prefix(model)}{k}": v for k, v in tower.items()}
    state.update({f"multi_modal_projector.{k}": v for k, v in projector.items()})
    if ccra_part is not None:
        state.update({f"ccra.{k}": v for k, v in ccra_part[1].items()})
    _load_strict(model, state, root)
    return LoadedCheckpoint(model.eval(), config, root, digest.hexdigest(), embed_tokens)


def save_ccra_weights(model: CCRAVisionModel, directory: str | Path) -> Path:
    """Write ``ccra.safetensors`` (weights + CCRAConfig metadata) into a LLaVA checkpoint directory."""
    if model.ccra is None or model.config.ccra is None:
        raise ValueError("the model has no CCRA module")
    path = Path(directory) / CCRA_WEIGHTS
    meta_config = asdict(model.config.ccra)
    meta_config["feature_layers"] = list(meta_config["feature_layers"])
    tensors = {k: v.detach().contiguous() for k, v in model.ccra.state_dict().items()}
    save_file(tensors, str(path), metadata={CCRA_CONFIG_KEY: json.dumps(meta_config)})
    return path
