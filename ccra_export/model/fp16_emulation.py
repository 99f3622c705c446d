"""FP16 arithmetic without a GPU: the PyTorch reference run in half precision on the CPU.

ONNX Runtime's CPU provider computes most FP16 ops in FP32 between casts, so CPU parity of an
FP16 graph measures FP16 storage, not FP16 arithmetic. PyTorch's CPU half kernels compute in
half, as a GPU would, so running the reference in half shows overflow and drift on any machine:
- with the graph's FP32 islands, at module granularity (``fp32_modules``: the CCRA module, and the
  tower or the projector where the build kept nodes of theirs FP32 for range): what a strongly
  typed engine computes. An island feeding another stays FP32 between them, as the graph does;
- with none, the whole model in half: what weak typing with the FP16 flag risks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ccra_export.model.vision_model import CCRAVisionModel, input_names, output_names

# The model's stages in data-flow order: each feeds the next (the tower feeds the projector
# directly in the plain variant).
STAGES = ("vision_tower", "ccra", "multi_modal_projector")


def _to_half(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.half() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_to_half(v) for v in value)
    if hasattr(value, "hidden_states"):  # the tower's ModelOutput
        for key in ("last_hidden_state", "pooler_output", "hidden_states"):
            if getattr(value, key, None) is not None:
                setattr(value, key, _to_half(getattr(value, key)))
    return value


class _FP32Island(nn.Module):
    """Runs ``inner`` in FP32 inside a half model; outputs go back to half unless ``keep_fp32``."""

    def __init__(self, inner: nn.Module, keep_fp32: bool) -> None:
        super().__init__()
        self.inner, self.keep_fp32 = inner.float(), keep_fp32

    def forward(self, *args: torch.Tensor, **kwargs: object) -> object:
        outputs = self.inner(*[a.float() if a.is_floating_point() else a for a in args], **kwargs)
        return outputs if self.keep_fp32 else _to_half(outputs)


@torch.no_grad()
def half_precision_outputs(
    model: CCRAVisionModel, feeds: dict[str, np.ndarray], *, fp32_modules: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """The reference's outputs computed in FP16 on the CPU (as float32 arrays), keyed by graph output;
    the stages named in ``fp32_modules`` (of ``STAGES``) computed in FP32."""
    half = copy.deepcopy(model).half().eval()
    present = [name for name in STAGES if getattr(half, name, None) is not None]
    kept = [name for name in present if name in set(fp32_modules)]
    for name in kept:
        following = present[present.index(name) + 1 :]
        feeds_fp32 = bool(following) and following[0] in kept
        setattr(half, name, _FP32Island(getattr(half, name), keep_fp32=feeds_fp32))
    args = []
    for name in input_names(model.config):
        tensor = torch.from_numpy(np.ascontiguousarray(feeds[name]))
        args.append(tensor.half() if tensor.is_floating_point() else tensor)
    outputs = half(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {name: out.float().numpy() for name, out in zip(output_names(model), outputs, strict=True)}
