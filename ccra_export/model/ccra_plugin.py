"""The CCRA module as a plug-in point: ``package.module:Factory`` -> the ``torch.nn.Module`` to export.

The interface (docs/ccra.md, "Bring your own CCRA"):

- ``Factory(spec: CCRAModuleSpec) -> torch.nn.Module``. The factory is a ``torch.nn.Module``
  subclass taking the spec, or a function marked with ``@ccra_module_factory``: a name in a
  checkpoint is never an arbitrary callable (``os:system``).
- ``forward(features, text_embeds, text_mask)``: ``features`` [B, L, N, Dv] are the CLIP tower's
  patch hidden states of ``spec.feature_layers`` (CLS dropped), stacked; ``text_embeds`` [B, T, Dt]
  the instruction's token embeddings, ``text_mask`` [B, T] int64 (1 = token, 0 = padding). It
  returns the features for LLaVA's projector [B, N, Dv], or those and an attention map [B, L, N]
  (what `explain` and `run --attention-map` draw).
- Weights come from ``ccra.safetensors`` by the module's own ``state_dict`` names.
- ``lpwca_contract = True`` (class attribute) declares that the module computes LPWCA exactly as
  the ``ccra::LPWCA`` node does, and switches with ``lpwca_impl = "fused"``; only such a module may
  be exported with ``--lpwca fused``. The reconstruction is the one that does.

The reconstruction (``ccra_module.reconstruction``) is loaded through this same path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ccra_export.core.config import CCRAConfig, check_module_path
from ccra_export.core.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__ccra_module_factory__"


class CCRAModuleError(ConfigError):
    """A CCRA module that cannot be imported, lacks the interface, or does not trace to ONNX."""


@dataclass(frozen=True)
class CCRAModuleSpec:
    """What a CCRA module factory is given."""

    config: CCRAConfig  # feature_layers, text_hidden_size, options (and the reconstruction's sizes)
    vision_hidden_size: int  # Dv, the CLIP tower's width (also the projector's input)
    num_patches: int  # N

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.config.feature_layers)

    @property
    def num_layers(self) -> int:
        return len(self.config.feature_layers)

    @property
    def text_hidden_size(self) -> int:
        return self.config.text_hidden_size

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.config.options)


def ccra_module_factory(function: F) -> F:
    """Mark a function as a CCRA module factory (a Module subclass needs no mark)."""
    setattr(function, _MARK, True)
    return function


def load_factory(path: str) -> Callable[[CCRAModuleSpec], nn.Module]:
    """Import ``package.module:Factory`` from the environment (installed, or on PYTHONPATH: the
    working directory is not searched, so a checkpoint directory cannot ship code that a name in its
    metadata would import); one line naming it and what was expected otherwise."""
    try:
        check_module_path(path, field="ccra_module")
    except ConfigError as exc:
        raise CCRAModuleError(exc.message, field=exc.field) from None
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises at import time
        raise CCRAModuleError(
            f"cannot import {module_name} ({type(exc).__name__}: {exc})", field="ccra_module", value=path
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise CCRAModuleError(f"{module_name} has no attribute {attribute!r}", field="ccra_module", value=path)
        target = getattr(target, part)
    is_module_class = isinstance(target, type) and issubclass(target, nn.Module)
    if not is_module_class and not (callable(target) and getattr(target, _MARK, False)):
        raise CCRAModuleError(
            "expected a torch.nn.Module subclass or a function marked @ccra_module_factory, taking a CCRAModuleSpec",
            field="ccra_module",
            value=path,
        )
    return target


def make_module(path: str, spec: CCRAModuleSpec) -> nn.Module:
    """The module the factory at ``path`` builds for ``spec`` (weights as it initialises them)."""
    factory = load_factory(path)
    try:
        module = factory(spec)
    except CCRAModuleError:
        raise
    except Exception as exc:
        raise CCRAModuleError(
            f"the factory failed on this model's sizes ({type(exc).__name__}: {exc})", field="ccra_module", value=path
        ) from None
    if not isinstance(module, nn.Module):
        raise CCRAModuleError(
            f"the factory returned {type(module).__name__}, not a torch.nn.Module", field="ccra_module", value=path
        )
    return module


def declares_lpwca_contract(module: nn.Module) -> bool:
    """Whether the module says it computes ``ccra::LPWCA`` exactly (and can switch to the fused node)."""
    config = getattr(module, "config", None)
    return (
        getattr(type(module), "lpwca_contract", False) is True
        and hasattr(module, "lpwca_impl")
        and all(hasattr(config, name) for name in ("num_heads", "num_layers", "head_dim", "layer_norm_eps"))
    )


@torch.no_grad()
def probe_outputs(path: str, module: nn.Module, spec: CCRAModuleSpec) -> bool:
    """Run the module once on small random inputs of this model's sizes and check what it returns;
    True when it returns an attention map too. One line naming the module otherwise."""
    batch, text_len = 2, 3
    features = torch.randn(batch, spec.num_layers, spec.num_patches, spec.vision_hidden_size)
    text = torch.randn(batch, text_len, spec.text_hidden_size)
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    expected = f"[{batch}, {spec.num_patches}, {spec.vision_hidden_size}] features (and optionally a [B, L, N] map)"
    was_training = module.training
    module.eval()
    try:
        outputs = module(features, text, mask)
    except Exception as exc:
        raise CCRAModuleError(
            "forward(features [B, L, N, Dv], text_embeds [B, T, Dt], text_mask [B, T]) "
            f"failed ({type(exc).__name__}: {exc})",
            field="ccra_module",
            value=path,
        ) from None
    finally:
        module.train(was_training)
    attention = None
    if isinstance(outputs, tuple | list):
        if len(outputs) != 2:
            raise CCRAModuleError(
                f"forward returned {len(outputs)} values; expected {expected}", field="ccra_module", value=path
            )
        outputs, attention = outputs
    if not isinstance(outputs, torch.Tensor) or tuple(outputs.shape) != (
        batch,
        spec.num_patches,
        spec.vision_hidden_size,
    ):
        got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise CCRAModuleError(f"forward returned {got}; expected {expected}", field="ccra_module", value=path)
    if attention is not None:
        want = (batch, spec.num_layers, spec.num_patches)
        if not isinstance(attention, torch.Tensor) or tuple(attention.shape) != want:
            got = tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__
            raise CCRAModuleError(
                f"the attention map is {got}; expected [B, L, N] = {list(want)}", field="ccra_module", value=path
            )
    return attention is not None
