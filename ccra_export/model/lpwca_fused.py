"""The fused LPWCA path in PyTorch: query folding and the ``ccra::lpwca`` custom op.

The exporter turns ``torch.ops.ccra.lpwca`` into one ``ccra::LPWCA`` ONNX node; the folding that
feeds it (a few [B, H+1, Dv] products per image) stays ordinary ONNX ops before it. The op's
eager body is the folded algebra written in torch, so the fused model also runs in PyTorch and
tests compare it with the plain reference (``CCRA.lpwca``), which is never folded.
"""

from __future__ import annotations

import torch

from ccra_export.core.errors import ConfigError

LIMIT_HEADS = 16  # trt_plugins/lpwca/lpwca_params.h kMaxHeads (a test checks they agree)
LIMIT_LAYERS = 64  # kMaxLayers


def fold_query(ccra: torch.nn.Module, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image folded query: weights [B, H+1, Dv] and score offsets [B, L, H] (shared/CCRA.md).

    Row h < H: gamma_k * (W_k,h^T q_h); row H: W_lk^T (W_lq q).
    Offsets: beta_k . u_h + b_k,h . q_h + E_l,h . q_h with u_h = W_k,h^T q_h.
    """
    config = ccra.config
    batch, heads, head_dim, layers = q.shape[0], config.num_heads, config.head_dim, config.num_layers
    width = ccra.key.weight.shape[1]
    q_heads = q.reshape(batch, heads, 1, head_dim)
    key_weight = ccra.key.weight.reshape(heads, head_dim, width)
    u = torch.matmul(q_heads, key_weight).squeeze(2)  # [B, H, Dv]
    q_heads = q_heads.squeeze(2)  # [B, H, dh]
    offset = torch.matmul(u, ccra.key_norm.bias.unsqueeze(-1)).squeeze(-1)  # beta . u_h: [B, H]
    offset = offset + (q_heads * ccra.key.bias.reshape(heads, head_dim)).sum(-1)  # + b_k,h . q_h
    layer_embed = ccra.layer_embed.reshape(layers, heads, head_dim).transpose(0, 1)  # [H, L, dh]
    per_layer = torch.matmul(layer_embed, q_heads.unsqueeze(-1)).squeeze(-1)  # E_l,h . q_h: [B, H, L]
    bias = per_layer.transpose(1, 2) + offset.unsqueeze(1)  # [B, L, H]
    z = torch.matmul(ccra.layer_query(q), ccra.layer_key.weight)  # [B, Dv]
    weights = torch.cat([u * ccra.key_norm.weight, z.unsqueeze(1)], dim=1)  # [B, H+1, Dv]
    # contiguous: the kernels read raw [B, H+1, Dv] and [B, L, H] buffers (a transpose keeps its strides)
    return weights.float().contiguous(), bias.float().contiguous()


@torch.library.custom_op("ccra::lpwca", mutates_args=())
def lpwca(
    features: torch.Tensor,
    query_weights: torch.Tensor,
    query_bias: torch.Tensor,
    num_heads: int,
    epsilon: float,
    head_scale: float,
    layer_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LPWCA stages 2+3 from folded queries: V [B,L,N,Dv] -> F [B,N,Dv], A [B,L,N] (FP32 math).

    F comes back in the features' dtype, A in float32 whatever it: the kernels' contract
    (trt_plugins/lpwca/README.md). A sums to 1 over L*N positions, so its mean, 1/(L*N), is below
    FP16's smallest normal (6.1e-5) at llava-1.5-7b sizes; in FP16 most of it would be subnormal.
    """
    batch, layers, patches, _ = features.shape
    x = features.float()
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + epsilon)
    dots = torch.matmul(x, query_weights.transpose(1, 2).unsqueeze(1))  # [B, L, N, H+1]
    weight_sum = query_weights[:, :num_heads].sum(-1)[:, None, None, :]  # [B, 1, 1, H]
    scores = ((dots[..., :num_heads] - mean * weight_sum) * rstd + query_bias[:, :, None, :]) * head_scale
    attention = torch.softmax(scores.reshape(batch, layers * patches, num_heads), dim=1).mean(-1)
    attention = attention.reshape(batch, layers, patches)
    weight_g = layers * patches * attention
    alpha = torch.softmax(weight_g * dots[..., num_heads] * layer_scale, dim=1)
    fused = ((alpha * weight_g).unsqueeze(-1) * x).sum(1)
    return fused.to(features.dtype), attention.float()


@lpwca.register_fake
def _lpwca_fake(features, query_weights, query_bias, num_heads, epsilon, head_scale, layer_scale):  # noqa: ANN001
    """Shapes and dtypes for tracing: F like the features, A float32 (as the eager body and kernels)."""
    batch, layers, patches, width = features.shape
    return features.new_empty(batch, patches, width), features.new_empty(batch, layers, patches, dtype=torch.float32)


def check_kernel_limits(heads: int, layers: int) -> None:
    """Refuse at export time what the kernels cannot run, instead of failing at engine build."""
    if not 1 <= heads <= LIMIT_HEADS:
        raise ConfigError(
            f"the fused kernel supports 1..{LIMIT_HEADS} heads, the model has {heads}", field="lpwca", value="fused"
        )
    if not 1 <= layers <= LIMIT_LAYERS:
        raise ConfigError(
            f"the fused kernel supports 1..{LIMIT_LAYERS} layers, the model reads {layers}",
            field="lpwca",
            value="fused",
        )
