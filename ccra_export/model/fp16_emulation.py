"""FP16 arithmetic without a GPU: the PyTorch reference run in half precision on the CPU.

ONNX Runtime's CPU provider computes most FP16 ops in FP32 between casts, so CPU parity of an
FP16 graph measures FP16 storage, not FP16 arithmetic. PyTorch's CPU half kernels compute in
half, as a GPU would, so running the reference in half shows overflow and drift on any machine:
- ``islands``: the FP32 islands the graph keeps (the CCRA module, and the projector when the build
  kept it FP32 for F's range), everything else half: what a strongly typed engine runs;
- no islands: the whole model in half: what weak typing with the FP16 flag risks.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ccra_export.model.vision_model import CCRAVisionModel, input_names, output_names


class _FP32Island(nn.Module):
    """Runs ``inner`` in FP32 inside a half model; outputs go back to half unless ``keep_fp32``."""

    def __init__(self, inner: nn.Module, keep_fp32: bool) -> None:
        super().__init__()
        self.inner, self.keep_fp32 = inner.float(), keep_fp32

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.inner(*[a.float() if a.is_floating_point() else a for a in args])
        if self.keep_fp32:
            return outputs
        if isinstance(outputs, tuple):
            return tuple(o.half() for o in outputs)
        return outputs.half()


@torch.no_grad()
def half_precision_outputs(
    model: CCRAVisionModel, feeds: dict[str, np.ndarray], *, islands: bool, projector_fp32: bool = False
) -> dict[str, np.ndarray]:
    """The reference's outputs computed in FP16 on the CPU (as float32 arrays), keyed by graph output."""
    half = copy.deepcopy(model).half().eval()
    if islands and half.ccra is not None:
        half.ccra = _FP32Island(half.ccra, keep_fp32=projector_fp32)
    if islands and projector_fp32:
        half.multi_modal_projector = _FP32Island(half.multi_modal_projector, keep_fp32=False)
    args = []
    for name in input_names(model.config):
        tensor = torch.from_numpy(np.ascontiguousarray(feeds[name]))
        args.append(tensor.half() if tensor.is_floating_point() else tensor)
    outputs = half(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {name: out.float().numpy() for name, out in zip(output_names(model.config), outputs, strict=True)}
