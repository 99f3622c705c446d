"""CCRA-like modules written against the plug-in interface (README, "Bring your own CCRA").

``LayerGatedCrossAttention`` is deliberately unlike the reconstruction: the instruction's tokens
attend over all L x N layer-patch positions at once (no pooled query, no patch-wise stage), and a
learned gate, conditioned on the instruction, mixes the layers. The others exist to be refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ccra_export.model.ccra_plugin import CCRAModuleSpec, ccra_module_factory


class LayerGatedCrossAttention(nn.Module):
    """Text tokens -> cross-attention over every (layer, patch) position; a text-conditioned layer gate.

    Returns the fused patch features [B, N, Dv] and the attention each (layer, patch) position got,
    averaged over the instruction's tokens [B, L, N]."""

    def __init__(self, spec: CCRAModuleSpec) -> None:
        super().__init__()
        dv, dt, layers = spec.vision_hidden_size, spec.text_hidden_size, spec.num_layers
        width = int(spec.options.get("width", 48))
        self.width = width
        self.query = nn.Linear(dt, width)
        self.key_norm = nn.LayerNorm(dv)
        self.key = nn.Linear(dv, width)
        self.layer_logits = nn.Parameter(torch.zeros(layers))  # the learned layer gate
        self.gate_from_text = nn.Linear(dt, layers)  # its dependence on the instruction
        self.value = nn.Linear(dv, dv)
        self.out_norm = nn.LayerNorm(dv)

    def forward(
        self, features: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, layers, patches, _ = features.shape
        mask = text_mask.to(features.dtype).unsqueeze(-1)  # [B, T, 1]
        keys = self.key(self.key_norm(features)).reshape(batch, layers * patches, self.width)
        scores = torch.matmul(self.query(text_embeds), keys.transpose(1, 2)) / math.sqrt(self.width)  # [B, T, LN]
        weights = torch.softmax(scores, dim=-1)
        attention = (weights * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, LN]
        attention = attention.reshape(batch, layers, patches)
        pooled_text = (text_embeds * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, Dt]
        gate = torch.softmax(self.layer_logits + self.gate_from_text(pooled_text), dim=-1)  # [B, L]
        emphasis = 1.0 + layers * patches * attention  # positions the instruction points at count more
        fused = (gate[:, :, None, None] * emphasis.unsqueeze(-1) * features).sum(dim=1)  # [B, N, Dv]
        return self.out_norm(fused + self.value(fused)), attention


class FeaturesOnly(nn.Module):
    """A module that returns no attention map: text-conditioned mean over layers."""

    def __init__(self, spec: CCRAModuleSpec) -> None:
        super().__init__()
        self.scale = nn.Linear(spec.text_hidden_size, spec.vision_hidden_size)

    def forward(self, features: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        mask = text_mask.to(features.dtype).unsqueeze(-1)
        text = (text_embeds * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return features.mean(dim=1) * torch.sigmoid(self.scale(text)).unsqueeze(1)


@ccra_module_factory
def features_only(spec: CCRAModuleSpec) -> FeaturesOnly:
    """A marked factory function (the other form the interface accepts)."""
    return FeaturesOnly(spec)


def unmarked(spec: CCRAModuleSpec) -> FeaturesOnly:
    """Not marked @ccra_module_factory: refused, as ``os:system`` would be."""
    return FeaturesOnly(spec)


class WrongShape(nn.Module):
    """Returns the layers stacked: [B, L, N, Dv] instead of [B, N, Dv]."""

    def __init__(self, spec: CCRAModuleSpec) -> None:
        super().__init__()
        self.proj = nn.Linear(spec.vision_hidden_size, spec.vision_hidden_size)

    def forward(self, features: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class NotTraceable(nn.Module):
    """Branches in Python on a tensor's value: runs eagerly, cannot be exported with torch.export."""

    def __init__(self, spec: CCRAModuleSpec) -> None:
        super().__init__()
        self.proj = nn.Linear(spec.vision_hidden_size, spec.vision_hidden_size)

    def forward(self, features: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        fused = features.mean(dim=1)
        if text_embeds.sum() > 0:  # data-dependent control flow
            return self.proj(fused)
        return fused
