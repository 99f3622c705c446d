"""Load the vision half of a local Hugging Face LLaVA-1.5 checkpoint, plus CCRA weights if present.

Layout (docs/bundle.md, "Checkpoint layout"):

    CKPT/config.json                     LlavaConfig (model_type "llava", vision_config, text_config)
    CKPT/model*.safetensors [+ .index.json]  Hugging Face weights; only the vision tower, the
                                         projector (and the token embedding table, for parity
                                         inputs) are read, never the language model layers
    CKPT/ccra.safetensors                optional: CCRA weights named as ``CCRA.state_dict()``,
                                         its CCRAConfig as JSON in the metadata key "ccra_config"

Without ``ccra.safetensors`` the checkpoint is plain LLaVA-1.5 and builds the plain variant.
Before any tensor is read the whole directory is validated from its configs and safetensors
headers (``checkpoint_check``), so a bad checkpoint is one line naming the file at fault.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ccra_export.core.config import ModelConfig
from ccra_export.core.errors import CheckpointError
from ccra_export.core.hashing import TensorDigest
from ccra_export.model.checkpoint_check import (
    CCRA_CONFIG_KEY,
    CCRA_MODULE_KEY,
    CCRA_WEIGHTS,
    ENCODER_LAYER_KEY,
    PROJECTOR_KEY,
    TOWER_KEY,
    LanguageModelRequest,
    model_config_from_hf,
    validate_checkpoint,
)
from ccra_export.model.vision_model import CCRAVisionModel, build_model

__all__ = [
    "CCRA_CONFIG_KEY",
    "CCRA_WEIGHTS",
    "LanguageModelRequest",
    "LoadedCheckpoint",
    "load_checkpoint",
    "model_config_from_hf",
    "save_ccra_weights",
]


@dataclass
class LoadedCheckpoint:
    model: CCRAVisionModel
    config: ModelConfig
    path: Path
    weights_sha256: str
    embed_tokens: tuple[Path, str] | None  # (file, tensor name) of the LM token embedding table
    image_token_id: int | None = None  # the tokenizer's <image> id (checked when a language model was requested)

    def token_embeddings(self) -> np.ndarray | None:
        """The language model's input embedding table, float32 (for realistic parity inputs)."""
        if self.embed_tokens is None:
            return None
        file, name = self.embed_tokens
        with _open(file) as handle:
            return _tensor(handle, file, name).float().numpy()


def _open(path: Path):
    try:
        return safe_open(str(path), "pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _tensor(handle: Any, file: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as exc:  # a file changed since it was validated
        raise CheckpointError(f"{file}: tensor {name} unreadable ({exc})") from None


def _digest_tensor(digest: TensorDigest, name: str, tensor: torch.Tensor) -> None:
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    digest.add(name, str(tensor.dtype), tuple(tensor.shape), raw)


def _read_ccra(path: Path, digest: TensorDigest) -> dict[str, torch.Tensor]:
    """CCRA's tensors (their names, shapes and ccra_config were validated from the header)."""
    tensors = {}
    with _open(path) as handle:
        for name in handle.keys():
            tensor = _tensor(handle, path, name)
            _digest_tensor(digest, f"ccra.{name}", tensor)
            tensors[name] = tensor.float()
    return tensors


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


def load_checkpoint(
    path: str | Path, language_model: LanguageModelRequest | None = None, ccra_module: str | None = None
) -> LoadedCheckpoint:
    """Validate the whole checkpoint (configs, headers, tokenizer; see ``checkpoint_check``), then
    read the vision-side weights; the language model's layers are never loaded.

    ``language_model``: ``--lm-precision`` was asked for, so what it needs is checked up front too.
    ``ccra_module``: ``--ccra-module``, the CCRA implementation the weights are for."""
    checked = validate_checkpoint(path, language_model, ccra_module)
    root, config = checked.root, checked.config
    digest = TensorDigest()
    ccra_tensors = _read_ccra(checked.ccra_file, digest) if checked.ccra_file is not None else None

    tower: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    for file in checked.weight_files:
        with _open(file) as handle:
            for name in handle.keys():
                if (match := TOWER_KEY.match(name)) is not None:
                    rest = match["rest"]
                    layer = ENCODER_LAYER_KEY.match(rest)
                    if layer is not None and int(layer[1]) >= config.tower_layers_needed:
                        continue  # layers after the last one read are not part of the graph
                    target, key = tower, rest
                elif (match := PROJECTOR_KEY.match(name)) is not None:
                    target, key = projector, match["rest"]
                else:
                    continue
                tensor = _tensor(handle, file, name)
                _digest_tensor(digest, name, tensor)
                target[key] = tensor.float()
    if not tower or not projector:
        missing = "vision_tower.*" if not tower else "multi_modal_projector.*"
        raise CheckpointError(f"{root}: no {missing} tensors in the safetensors files; is this a LLaVA checkpoint?")

    model = build_model(config)
    state = {f"vision_tower.{_tower_prefix(model)}{k}": v for k, v in tower.items()}
    state.update({f"multi_modal_projector.{k}": v for k, v in projector.items()})
    if ccra_tensors is not None:
        state.update({f"ccra.{k}": v for k, v in ccra_tensors.items()})
    _load_strict(model, state, root)
    return LoadedCheckpoint(
        model.eval(), config, root, digest.hexdigest(), checked.embed_tokens, checked.image_token_id
    )


def save_ccra_weights(model: CCRAVisionModel, directory: str | Path) -> Path:
    """Write ``ccra.safetensors`` (weights + CCRAConfig metadata) into a LLaVA checkpoint directory."""
    if model.ccra is None or model.config.ccra is None:
        raise ValueError("the model has no CCRA module")
    path = Path(directory) / CCRA_WEIGHTS
    meta_config = asdict(model.config.ccra)
    meta_config["feature_layers"] = list(meta_config["feature_layers"])
    module = meta_config.pop("module")
    if not meta_config["options"]:  # readers from before plug-ins refuse unknown keys
        meta_config.pop("options")
    metadata = {CCRA_CONFIG_KEY: json.dumps(meta_config)}
    if module is not None:  # a plug-in module: its weights load only into it
        metadata[CCRA_MODULE_KEY] = module
    tensors = {k: v.detach().contiguous() for k, v in model.ccra.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)
    return path
