"""The PyTorch reference a bundle is built from and checked against: a preset or a checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ccra_export.core.config import PRESETS, ModelConfig, preset
from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import CheckpointError, ConfigError


@dataclass
class Source:
    """The PyTorch reference a bundle is built from and checked against."""

    model: Any  # CCRAVisionModel (torch stays out of this module's import time)
    config: ModelConfig
    record: dict[str, Any]
    token_embeddings: np.ndarray | None = None


def resolve_source(model: str, *, random_weights: bool, seed: int, plain: bool, steps: Steps = SILENT) -> Source:
    """A preset (random weights only: presets carry no trained weights) or a checkpoint directory."""
    from ccra_export.model.vision_model import build_model  # torch: the [export] extra

    if model in PRESETS:
        if not random_weights:
            raise ConfigError(
                f"--model {model}: a preset has no trained weights; "
                "add --random-weights, or pass a checkpoint directory"
            )
        config = preset(model, plain=plain)
        with steps.step(f"Building {config.name} ({config.variant}) with random weights, seed {seed}"):
            built = build_model(config, seed=seed)
        return Source(built, config, {"kind": "preset", "preset": model, "plain": plain, "seed": seed})

    path = Path(model)
    if not path.exists():
        if os.sep in model or model.startswith("."):
            raise CheckpointError(f"--model {model}: no such checkpoint directory")
        raise ConfigError(
            f"--model: unknown preset {model!r}; expected one of {', '.join(PRESETS)} or a checkpoint directory"
        )
    if random_weights or plain:
        flag = "--random-weights" if random_weights else "--plain"
        raise ConfigError(f"{flag} applies to presets; --model {model} is a checkpoint directory")
    from ccra_export.model.checkpoint import load_checkpoint  # torch: the [export] extra

    with steps.step(f"Loading checkpoint {path}"):
        loaded = load_checkpoint(path)
    if loaded.config.ccra is None:
        steps.info(
            f"{path}: no ccra.safetensors; building the plain LLaVA-1.5 variant (graph input: pixel_values only)"
        )
    record = {"kind": "checkpoint", "path": str(path.resolve()), "weights_sha256": loaded.weights_sha256}
    return Source(loaded.model, loaded.config, record, loaded.token_embeddings())


def source_from_manifest(manifest: dict[str, Any], model_override: str | None, steps: Steps = SILENT) -> Source:
    """Rebuild the PyTorch reference a bundle was built from, refusing a changed checkpoint."""
    record = manifest["source"]
    if record["kind"] == "preset":
        if model_override:
            raise ConfigError("--model applies to bundles built from a checkpoint; this one was built from a preset")
        return resolve_source(
            record["preset"], random_weights=True, seed=record["seed"], plain=record["plain"], steps=steps
        )
    path = model_override or record["path"]
    if not Path(path).is_dir():
        raise CheckpointError(f"checkpoint {path} (from the manifest) is not there; pass --model with its new location")
    source = resolve_source(path, random_weights=False, seed=0, plain=False, steps=steps)
    if source.record["weights_sha256"] != record["weights_sha256"]:
        raise CheckpointError(
            f"--model {path}: weights differ from the ones this bundle was built from (sha256 mismatch)"
        )
    return source
