"""The PyTorch reference a bundle is built from and checked against: a preset or a checkpoint."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ccra_export.core.config import DEFAULT_CCRA_MODULE, PRESETS, ModelConfig, check_module_path, preset
from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import CheckpointError, ConfigError
from ccra_export.core.manifest_schema import Manifest
from ccra_export.demo import CHECKPOINT as DEMO_CHECKPOINT
from ccra_export.demo import DEMO
from ccra_export.runtime.vision_backend import available_providers
from ccra_export.workflows.language_model import check_kv_binding, resolve_device

if TYPE_CHECKING:
    from ccra_export.model.checkpoint_check import LanguageModelRequest


def demo_checkpoint() -> Path:
    """The shipped demo checkpoint (package data), or one line saying this installation lacks it."""
    if not (DEMO_CHECKPOINT / "config.json").is_file():
        raise CheckpointError(
            f"the demo checkpoint is missing from this installation ({DEMO_CHECKPOINT}); "
            "reinstall ccra-export, or rebuild it with python -m ccra_export.demo.train",
            field="model",
            value=DEMO,
        )
    return DEMO_CHECKPOINT


def reference_checkpoint(manifest: Manifest, model: str | None) -> str | None:
    """The checkpoint ``--model`` names for a bundle's PyTorch reference: ``demo`` is the shipped
    one, and a bundle built from the demo finds it without ``--model`` (it is this installation's
    own package data, not a path the manifest chose; its hash is still checked)."""
    if model == DEMO or (model is None and manifest["source"].get("name") == DEMO):
        return str(demo_checkpoint())
    return model


@dataclass
class Source:
    """The PyTorch reference a bundle is built from and checked against."""

    model: Any  # CCRAVisionModel (torch stays out of this module's import time)
    config: ModelConfig
    record: dict[str, Any]
    token_embeddings: np.ndarray | None = None


def language_model_request(
    lm_precision: str | None, lm_device: str, vision_backend: str
) -> LanguageModelRequest | None:
    """What ``--lm-precision`` will need from the checkpoint, so that it is checked before any export.

    The decoder's attention runs on ONNX Runtime's CPU GroupQueryAttention for a CPU target, and
    for a CUDA target checked on a machine whose ONNX Runtime has no CUDA provider."""
    if not lm_precision:
        return None
    from ccra_export.model.checkpoint_check import LanguageModelRequest  # torch: the [export] extra

    device, why = resolve_device(lm_device, vision_backend)
    check_kv_binding(lm_precision, device)
    why = f"lm_device {why if lm_device == 'auto' else device}"
    if device == "cpu":
        return LanguageModelRequest(lm_precision, cpu_attention=True, why=why)
    if "CUDAExecutionProvider" not in available_providers():
        return LanguageModelRequest(
            lm_precision, cpu_attention=True, why="the CUDA decoder is checked on the CPU provider: no CUDA here"
        )
    return LanguageModelRequest(lm_precision, cpu_attention=False, why=why)


def resolve_source(
    model: str,
    *,
    random_weights: bool,
    seed: int,
    plain: bool,
    steps: Steps = SILENT,
    language_model: LanguageModelRequest | None = None,
    ccra_module: str | None = None,
) -> Source:
    """A preset (random weights only: presets carry no trained weights) or a checkpoint directory.

    A checkpoint is validated whole before anything is read from it (``language_model``: with
    what the language model build needs), so a bad one fails in seconds, before any export.
    ``ccra_module`` (``--ccra-module``): the CCRA implementation, instead of the reconstruction
    (presets) or of the checkpoint's own ``ccra_module`` entry."""
    from ccra_export.model.vision_model import build_model  # torch: the [export] extra

    if ccra_module is not None:
        check_module_path(ccra_module, field="ccra_module")
    if model == DEMO:
        if random_weights or plain:
            given = "random_weights" if random_weights else "plain"
            raise ConfigError(
                f"{{model}} {DEMO} is a trained CCRA checkpoint; {{{given}}} applies to the random presets "
                f"({', '.join(PRESETS)})",
                field=given,
                mentions=("model", given),
            )
        source = resolve_source(
            str(demo_checkpoint()),
            random_weights=False,
            seed=seed,
            plain=False,
            steps=steps,
            language_model=language_model,
            ccra_module=ccra_module,
        )
        source.record["name"] = DEMO
        return source
    if model in PRESETS:
        if ccra_module == DEFAULT_CCRA_MODULE:
            ccra_module = None
        if not random_weights:
            raise ConfigError(
                "a preset has no trained weights; add {random_weights}, or pass a checkpoint directory",
                field="model",
                value=model,
                mentions=("random_weights",),
            )
        config = preset(model, plain=plain)
        if ccra_module is not None:
            if config.ccra is None:
                raise ConfigError(
                    "{plain} builds LLaVA-1.5 without a CCRA module", field="ccra_module", mentions=("plain",)
                )
            config = config.with_ccra(dataclasses.replace(config.ccra, module=ccra_module))
            steps.info(f"CCRA module: {ccra_module} (a plug-in; the reconstruction is {DEFAULT_CCRA_MODULE})")
        with steps.step(f"Building {config.name} ({config.variant}) with random weights, seed {seed}"):
            built = build_model(config, seed=seed)
        record = {"kind": "preset", "preset": model, "plain": plain, "seed": seed}
        return Source(built, config, {**record, **_module_record(config)})

    path = Path(model)
    if not path.exists():
        if os.sep in model or model.startswith("."):
            raise CheckpointError("no such checkpoint directory", field="model", value=model)
        raise ConfigError(
            f"unknown preset {model!r}; expected one of {', '.join(PRESETS)} or a checkpoint directory", field="model"
        )
    if random_weights or plain:
        given = "random_weights" if random_weights else "plain"
        raise ConfigError(
            f"{{{given}}} applies to presets; {{model}} {model} is a checkpoint directory", mentions=(given, "model")
        )
    from ccra_export.model.checkpoint import load_checkpoint  # torch: the [export] extra

    with steps.step(f"Loading checkpoint {path}"):
        loaded = load_checkpoint(path, language_model, ccra_module)
    if loaded.config.ccra is None:
        if ccra_module is not None:
            raise ConfigError(f"{path} has no ccra.safetensors (the module's weights)", field="ccra_module")
        steps.info(
            f"{path}: no ccra.safetensors; building the plain LLaVA-1.5 variant (graph input: pixel_values only)"
        )
    elif loaded.config.ccra.is_plugin:
        steps.info(f"CCRA module: {loaded.config.ccra.module} (a plug-in)")
    record = {"kind": "checkpoint", "path": str(path.resolve()), "weights_sha256": loaded.weights_sha256}
    return Source(loaded.model, loaded.config, {**record, **_module_record(loaded.config)}, loaded.token_embeddings())


def _module_record(config: ModelConfig) -> dict[str, Any]:
    """The source record's ``ccra_module``, for a plug-in only (reconstruction bundles stay as they were)."""
    return {"ccra_module": config.ccra.module} if config.ccra is not None and config.ccra.is_plugin else {}


def recorded_module(manifest: Manifest) -> str | None:
    """The plug-in CCRA module a bundle was built with (None: the reconstruction, or plain)."""
    module = manifest["source"].get("ccra_module")
    return module if isinstance(module, str) else None


def source_from_manifest(
    manifest: Manifest, model_override: str | None, steps: Steps = SILENT, ccra_module: str | None = None
) -> Source:
    """Rebuild the PyTorch reference a bundle was built from, refusing a changed checkpoint.

    A plug-in CCRA module is imported only when the user names it (``--ccra-module``, equal to the
    one recorded): a bundle's manifest never makes ccra-export import code."""
    record = manifest["source"]
    module = recorded_module(manifest)
    if ccra_module is not None and ccra_module == DEFAULT_CCRA_MODULE:
        ccra_module = None
    if module != ccra_module:
        if module is None:
            raise ConfigError(
                "this bundle was built with the reconstruction of CCRA", field="ccra_module", value=ccra_module
            )
        raise ConfigError(
            f"this bundle's CCRA module is the plug-in {module}; pass {{ccra_module}} {module} to rebuild its "
            "PyTorch reference (a manifest never makes ccra-export import code)",
            field="ccra_module",
            mentions=("ccra_module",),
        )
    if record["kind"] == "preset":
        if model_override:
            raise ConfigError(
                "{model} applies to bundles built from a checkpoint; this one was built from a preset",
                mentions=("model",),
            )
        return resolve_source(
            record["preset"],
            random_weights=True,
            seed=record["seed"],
            plain=record["plain"],
            steps=steps,
            ccra_module=module,
        )
    path = reference_checkpoint(manifest, model_override)
    if path is None:  # the recorded path is provenance, not an instruction: the user names the checkpoint
        raise CheckpointError(
            "pass {model} DIR, the checkpoint this bundle was built from (recorded as "
            f"{record['path']}); a bundle's manifest never sends ccra-export outside the bundle",
            field="reference",
            value="pytorch",
            mentions=("model",),
        )
    if not Path(path).is_dir():
        raise CheckpointError("no such checkpoint directory", field="model", value=path)
    source = resolve_source(path, random_weights=False, seed=0, plain=False, steps=steps, ccra_module=module)
    if source.record["weights_sha256"] != record["weights_sha256"]:
        raise CheckpointError(
            "weights differ from the ones this bundle was built from (sha256 mismatch)", field="model", value=path
        )
    return source
