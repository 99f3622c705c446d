"""INT8 Q/DQ quantization of the FP32 vision graph with ONNX Runtime's static quantizer.

Why ONNX Runtime's quantizer rather than NVIDIA ModelOpt: both write explicit Q/DQ graphs that
ONNX Runtime and TensorRT consume, but ModelOpt's ONNX extra pins onnxruntime-gpu next to
onnxruntime (two ORT distributions break each other) and forces the TensorRT execution provider
when a graph holds a custom op; ORT's quantizer calibrates on CPU with the ORT we already ship.

TensorRT-compatible settings: symmetric signed INT8 for activations and weights (zero point 0),
per-channel weights, QDQ format. Kept out of INT8 by default: LayerNormalization, Softmax and
the whole CCRA module (its attention re-weights features by up to L*N), plus any LPWCA node.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from onnxruntime.quantization import CalibrationDataReader

from ccra_export.core.atomic import make_shared
from ccra_export.core.errors import ConfigError
from ccra_export.core.graph_scopes import CCRA_SCOPE, in_scope
from ccra_export.core.lpwca_schema import OP_TYPE as LPWCA_OP
from ccra_export.runtime.ort_session import import_onnxruntime

# --calib-method -> onnxruntime.quantization.CalibrationMethod's member (ORT is imported when calibrating)
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
QUANTIZED_OP_TYPES = ("MatMul", "Gemm", "Conv")
ALWAYS_FLOAT_OP_TYPES = ("LayerNormalization", "Softmax", LPWCA_OP)


@dataclass
class QuantizationSummary:
    method: str
    quantized_nodes: int
    excluded_nodes: int
    quantize_ccra: bool
    per_channel: bool


def excluded_nodes(proto: onnx.ModelProto, *, quantize_ccra: bool) -> list[str]:
    """Nodes kept in floating point: LayerNorm, Softmax, LPWCA, and (by default) the CCRA module."""
    return [
        n.name
        for n in proto.graph.node
        if n.op_type in ALWAYS_FLOAT_OP_TYPES or (not quantize_ccra and in_scope(n, CCRA_SCOPE))
    ]


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ORT's quantizer prints progress and logs advice on the root logger; our progress bar and
    messages replace them."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_int8(
    fp32_model: Path,
    output: Path,
    reader: CalibrationDataReader,
    *,
    method: str,
    ort_cache: Path,
    quantize_ccra: bool = False,
    per_channel: bool = True,
) -> QuantizationSummary:
    """Calibrate on ``reader`` and write the Q/DQ graph to ``output`` (ranges to ``ort_cache``)."""
    if method not in METHODS:
        raise ConfigError(f"expected one of {', '.join(METHODS)}", field="calib_method", value=method)
    proto = onnx.load(str(fp32_model), load_external_data=False)
    excluded = excluded_nodes(proto, quantize_ccra=quantize_ccra)
    large = sum(t.ByteSize() for t in proto.graph.initializer) > (1 << 30) or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
    )
    with _quiet_quantizer():
        _run_quantize_static(fp32_model, output, reader, method, excluded, large, ort_cache, per_channel)
        make_shared(ort_cache)  # ONNX Runtime writes its cache through mkstemp: 0600
    quantized = onnx.load(str(output), load_external_data=False)
    count = sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    return QuantizationSummary(method, count, len(excluded), quantize_ccra, per_channel)


def _run_quantize_static(
    fp32_model: Path,
    output: Path,
    reader: CalibrationDataReader,
    method: str,
    excluded: list[str],
    large: bool,
    ort_cache: Path,
    per_channel: bool,
) -> None:
    quantization = import_onnxruntime("onnxruntime.quantization")
    quantization.quantize_static(
        str(fp32_model),
        str(output),
        calibration_data_reader=reader,
        quant_format=quantization.QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        per_channel=per_channel,
        activation_type=quantization.QuantType.QInt8,
        weight_type=quantization.QuantType.QInt8,
        nodes_to_exclude=excluded,
        use_external_data_format=large,
        calibrate_method=quantization.CalibrationMethod[METHODS[method]],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        calibration_cache_path=ort_cache,
    )
