"""PyTorch reference of the CCRA module (shared/CCRA.md), written plainly and unfolded.

This is the ground truth every exported graph, fused node and kernel is checked against, so it
favours the spec's equations over speed: keys are materialised, every softmax is explicit.
Parameter names are the checkpoint format (``ccra.safetensors``); do not rename them.

Symbols: B batch, L selected ViT layers, N patches, Dv vision width, T text tokens,
Dt text width, da attention width, H heads, dh = da / H.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ccra_export.core.config import CCRAConfig
from ccra_export.model.ccra_plugin import CCRAModuleSpec, ccra_module_factory, make_module
from ccra_export.model.lpwca_fused import fold_query, lpwca


class CCRA(nn.Module):
    """Progressive Attention Integration: text query -> LPWCA -> layer-wise -> patch-wise."""

    #: computes ``ccra::LPWCA`` exactly (stages 2-3), so ``--lpwca fused`` may replace them by the node
    lpwca_contract = True

    def __init__(self, config: CCRAConfig, vision_hidden_size: int, num_patches: int) -> None:
        super().__init__()
        self.config = config
        self.num_patches = num_patches
        dv, dt, da, layers = vision_hidden_size, config.text_hidden_size, config.attn_dim, config.num_layers
        eps = config.layer_norm_eps
        # 1. text query
        self.text_score = nn.Linear(dt, 1, bias=False)  # w_s
        self.query = nn.Linear(dt, da)  # W_q, b_q
        # 2. LPWCA keys
        self.key_norm = nn.LayerNorm(dv, eps=eps)  # LN_k
        self.key = nn.Linear(dv, da)  # W_k, b_k
        self.layer_embed = nn.Parameter(torch.zeros(layers, da))  # E
        # 3. layer-wise attention
        self.layer_query = nn.Linear(da, da, bias=False)  # W_lq
        self.layer_key = nn.Linear(dv, da)  # W_lk, b_lk
        # 4. patch-wise attention with a text gate
        self.patch_norm = nn.LayerNorm(dv, eps=eps)  # LN_p
        self.patch_query = nn.Linear(dv, da, bias=False)  # W_pq
        self.patch_key = nn.Linear(dv, da, bias=False)  # W_pk
        self.patch_out = nn.Linear(dv, dv, bias=False)  # W_po
        self.gate = nn.Linear(dv, da, bias=False)  # W_g
        self.gamma = nn.Parameter(torch.full((dv,), config.layer_scale_init))
        #: "portable": stages 2-3 as plain ops (the reference); "fused": folded query + ccra::lpwca
        self.lpwca_impl = "portable"

    def text_query(self, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Stage 1: masked attention pooling of the instruction, projected to q [B, da]."""
        logits = self.text_score(text_embeds).squeeze(-1)  # [B, T]
        logits = logits.masked_fill(text_mask == 0, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        pooled = torch.matmul(weights.unsqueeze(1), text_embeds).squeeze(1)  # [B, Dt]
        return self.query(pooled)

    def lpwca(self, features: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages 2 and 3 (the fused ``ccra::LPWCA`` node): V [B,L,N,Dv], q [B,da] -> F [B,N,Dv], A [B,L,N]."""
        batch, layers, patches, _ = features.shape
        heads, head_dim, da = self.config.num_heads, self.config.head_dim, self.config.attn_dim
        keys = self.key(self.key_norm(features)) + self.layer_embed[:, None, :]  # [B, L, N, da]
        keys = keys.reshape(batch, layers * patches, heads, head_dim).transpose(1, 2)  # [B, H, LN, dh]
        q_heads = q.reshape(batch, heads, head_dim, 1)
        scores = torch.matmul(keys, q_heads).squeeze(-1) / math.sqrt(head_dim)  # [B, H, LN]
        attention = torch.softmax(scores, dim=-1).mean(dim=1).reshape(batch, layers, patches)
        weighted = features * (layers * patches * attention).unsqueeze(-1)  # V' = G V

        layer_q = self.layer_query(q).reshape(batch, 1, da, 1)
        layer_logits = torch.matmul(self.layer_key(weighted), layer_q).squeeze(-1) / math.sqrt(da)  # [B, L, N]
        alpha = torch.softmax(layer_logits, dim=1)
        fused = (alpha.unsqueeze(-1) * weighted).sum(dim=1)  # [B, N, Dv]
        return fused, attention

    def lpwca_fused(self, features: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages 2-3 through the fused ``ccra::lpwca`` op on folded queries (same result as ``lpwca``)."""
        weights, bias = fold_query(self, q)
        cfg = self.config
        return lpwca(features, weights, bias, cfg.num_heads, cfg.layer_norm_eps, cfg.head_dim**-0.5, cfg.attn_dim**-0.5)

    def patch_attention(self, fused: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Stage 4: text-gated self-attention among the N fused patches, added with layer scale."""
        scale = 1.0 / math.sqrt(self.config.attn_dim)
        normed = self.patch_norm(fused)
        logits = torch.matmul(self.patch_query(normed), self.patch_key(normed).transpose(1, 2)) * scale
        mixed = torch.matmul(torch.softmax(logits, dim=-1), self.patch_out(fused))  # [B, N, Dv]
        gate = torch.sigmoid(torch.matmul(self.gate(fused), q.unsqueeze(-1)) * scale)  # [B, N, 1]
        return fused + self.gamma * gate * mixed

    def forward(
        self, features: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.text_query(text_embeds, text_mask)
        lpwca = self.lpwca if self.lpwca_impl == "portable" else self.lpwca_fused
        fused, attention = lpwca(features, q)
        return self.patch_attention(fused, q), attention


@ccra_module_factory
def reconstruction(spec: CCRAModuleSpec) -> CCRA:
    """The default CCRA module (``core.config.DEFAULT_CCRA_MODULE``), through the plug-in interface."""
    return CCRA(spec.config, spec.vision_hidden_size, spec.num_patches)


def ccra_parameter_count(config: CCRAConfig, vision_hidden_size: int, num_patches: int = 1) -> int:
    """Exact parameter count of the configured module, computed from its shapes (no weights allocated)."""
    with torch.device("meta"):
        module = make_module(config.module_path, CCRAModuleSpec(config, vision_hidden_size, num_patches))
    return sum(p.numel() for p in module.parameters())
