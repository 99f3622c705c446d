"""The exported graph as a PyTorch module: CLIP vision tower -> (CCRA) -> LLaVA-1.5 projector.

The tower is Hugging Face's own ``CLIPVisionModel``, so the plain variant reproduces
``LlavaForConditionalGeneration``'s vision path bit for bit. Encoder layers after the last one
the graph reads are dropped: they cost a full ViT layer and change no output.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.activations import ACT2FN

from ccra_export.core.config import ModelConfig
from ccra_export.core.vision_graphs import (
    HEAD,
    LPWCA_ATTENTION,
    PIXEL_VALUES,
    TEXT_EMBEDS,
    TEXT_MASK,
    TOWER,
    VISUAL_TOKENS,
    GraphPart,
    graph_parts,
)
from ccra_export.model.ccra_plugin import CCRAModuleSpec, make_module, probe_outputs


def input_names(config: ModelConfig) -> list[str]:
    return [PIXEL_VALUES] if config.ccra is None else [PIXEL_VALUES, TEXT_EMBEDS, TEXT_MASK]


def output_names(model: CCRAVisionModel) -> list[str]:
    """The single graph's outputs: visual tokens, and the attention map when the CCRA module gives one."""
    return [VISUAL_TOKENS, LPWCA_ATTENTION] if model.provides_attention else [VISUAL_TOKENS]


def model_parts(model: CCRAVisionModel, split: bool = False) -> tuple[GraphPart, ...]:
    """The graphs a build exports from ``model``, with this module's outputs."""
    return graph_parts(ccra=model.config.ccra is not None, split=split, attention=model.provides_attention)


def hf_vision_config(config: ModelConfig, num_layers: int | None = None) -> CLIPVisionConfig:
    v = config.vision
    return CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=num_layers or v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
        attn_implementation="eager",
    )


class LlavaProjector(nn.Module):
    """LLaVA-1.5 ``mlp2x_gelu``; same parameter names as ``LlavaMultiModalProjector``."""

    def __init__(self, in_features: int, out_features: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class CCRAVisionModel(nn.Module):
    """pixel_values [B,3,H,W] (+ text_embeds [B,T,Dt], text_mask [B,T]) -> visual tokens [B,N,Dlm]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionModel(hf_vision_config(config, config.tower_layers_needed))
        self.ccra: nn.Module | None = None
        #: whether the CCRA module also returns its attention map (the graphs' lpwca_attention output)
        self.provides_attention = config.ccra is not None
        if config.ccra is not None:  # the reconstruction or a user's module, through one factory interface
            spec = CCRAModuleSpec(config.ccra, config.vision.hidden_size, config.num_patches)
            self.ccra = make_module(config.ccra.module_path, spec)
            if config.ccra.is_plugin:
                self.provides_attention = probe_outputs(config.ccra.module_path, self.ccra, spec)
        self.multi_modal_projector = LlavaProjector(
            config.vision.hidden_size, config.lm_hidden_size, config.projector_act, config.projector_bias
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.ccra is None:
            hidden_states = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
            return self.multi_modal_projector(hidden_states[self.config.tower_layers_needed][:, 1:])
        if text_embeds is None or text_mask is None:
            raise ValueError("the CCRA variant needs text_embeds and text_mask")
        return self.head(self.tower_features(pixel_values), text_embeds, text_mask)

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The CLIP tower's part: the patch hidden states of CCRA's feature layers, stacked [B, L, N, Dv]."""
        return stacked_features(self.vision_tower, self.config.ccra.feature_layers, pixel_values)

    def head(
        self, features: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CCRA's text-conditioned part: stacked features + instruction -> visual tokens, LPWCA map."""
        return ccra_head(self.ccra, self.multi_modal_projector, features, text_embeds, text_mask)


def stacked_features(tower: nn.Module, layers: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    hidden_states = tower(pixel_values, output_hidden_states=True).hidden_states
    return torch.stack([hidden_states[i][:, 1:] for i in layers], dim=1)


def ccra_head(
    ccra: nn.Module, projector: nn.Module, features: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    out = ccra(features, text_embeds, text_mask)
    if isinstance(out, tuple | list):  # features and the attention map
        return projector(out[0]), out[1]
    return projector(out)


class VisionTowerGraph(nn.Module):
    """The exported ``vision_tower`` graph: pixel_values -> tower_features.

    It holds the full model's own ``vision_tower`` module under the same name, so weights and the
    exporter's module scopes (which the FP16 and INT8 passes select nodes by) are the single graph's."""

    def __init__(self, model: CCRAVisionModel) -> None:
        super().__init__()
        self.config = model.config
        self.vision_tower = model.vision_tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return stacked_features(self.vision_tower, self.config.ccra.feature_layers, pixel_values)


class CCRAHeadGraph(nn.Module):
    """The exported ``ccra_head`` graph: tower_features, text_embeds, text_mask -> visual tokens, LPWCA map."""

    def __init__(self, model: CCRAVisionModel) -> None:
        super().__init__()
        self.config = model.config
        self.ccra = model.ccra
        self.multi_modal_projector = model.multi_modal_projector

    def forward(
        self, tower_features: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ccra_head(self.ccra, self.multi_modal_projector, tower_features, text_embeds, text_mask)


def part_module(model: CCRAVisionModel, part: GraphPart) -> nn.Module:
    """The module an exported graph part traces: the whole model, its tower, or CCRA's head."""
    if part.name == TOWER.name:
        return VisionTowerGraph(model)
    if part.name == HEAD.name:
        return CCRAHeadGraph(model)
    return model


@torch.no_grad()
def randomize_weights(model: CCRAVisionModel, seed: int) -> CCRAVisionModel:
    """Seeded, trained-like random weights.

    PyTorch's default init leaves LayerNorm at identity, biases at zero and the CCRA layer scale
    tiny, which would hide exactly the branches a parity check must see. Here every tensor is
    perturbed at a scale that keeps activations O(1), so every stage moves the output.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    for name, param in model.named_parameters():
        if "norm" in name or "layrnorm" in name:
            param.copy_((1.0 if name.endswith("weight") else 0.0) + normal(param.shape, 0.1))
        elif name.endswith("gamma"):
            param.copy_(0.5 + normal(param.shape, 0.1))
        elif name.endswith("layer_embed"):
            param.copy_(normal(param.shape, 0.5))
        elif param.ndim == 1:  # biases, class embedding
            param.copy_(normal(param.shape, 0.02))
        else:
            fan_in = param[0].numel()
            param.copy_(normal(param.shape, fan_in**-0.5))
    return model


def build_model(config: ModelConfig, *, seed: int | None = None) -> CCRAVisionModel:
    """An eval-mode model; ``seed`` fills it with :func:`randomize_weights`."""
    model = CCRAVisionModel(config).eval()
    if seed is not None:
        randomize_weights(model, seed)
    return model


@torch.no_grad()
def reference_part_outputs(
    model: CCRAVisionModel, part: GraphPart, feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The FP32 PyTorch reference of one graph part on its own numpy feeds."""
    args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in part.inputs]
    outputs = part_module(model.float(), part)(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {name: out.numpy() for name, out in zip(part.outputs, outputs, strict=True)}


@torch.no_grad()
def reference_outputs(model: CCRAVisionModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the FP32 PyTorch reference on numpy feeds; outputs keyed by graph output name."""
    config = model.config
    args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in input_names(config)]
    outputs = model.float()(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {name: out.numpy() for name, out in zip(output_names(model), outputs, strict=True)}
