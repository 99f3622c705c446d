"""ONNX translation of ``torch.ops.ccra.lpwca`` to one ``ccra::LPWCA`` node (dynamo exporter)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnxscript
import torch

from ccra_export.core import lpwca_schema
from ccra_export.core.errors import ConfigError
from ccra_export.model.lpwca_fused import check_kernel_limits, lpwca

lpwca_schema.register()  # onnxscript resolves the op's outputs from the registered schema
_CCRA = onnxscript.values.Opset(lpwca_schema.DOMAIN, lpwca_schema.VERSION)


def lpwca_to_onnx(
    features,
    query_weights,
    query_bias,
    num_heads: int,
    epsilon: float,
    head_scale: float,
    layer_scale: float,
):
    return _CCRA.LPWCA(
        features,
        query_weights,
        query_bias,
        num_heads=num_heads,
        epsilon=epsilon,
        head_scale=head_scale,
        layer_scale=layer_scale,
        plugin_version=lpwca_schema.PLUGIN_VERSION,
        plugin_namespace=lpwca_schema.PLUGIN_NAMESPACE,
    )


TRANSLATION_TABLE = {torch.ops.ccra.lpwca.default: lpwca_to_onnx}
assert lpwca is not None  # the import registers torch.ops.ccra.lpwca


@contextlib.contextmanager
def lpwca_mode(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Temporarily switch a CCRAVisionModel's LPWCA stage to ``portable`` or ``fused``."""
    ccra = getattr(model, "ccra", None)
    if mode not in ("portable", "fused"):
        raise ConfigError("expected portable or fused", field="lpwca", value=mode)
    if ccra is None or mode == "portable":
        yield
        return
    check_kernel_limits(ccra.config.num_heads, ccra.config.num_layers)
    previous, ccra.lpwca_impl = ccra.lpwca_impl, mode
    try:
        yield
    finally:
        ccra.lpwca_impl = previous
