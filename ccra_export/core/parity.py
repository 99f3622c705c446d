"""Accuracy parity of a built artifact against the PyTorch reference, as numbers with thresholds.

numpy only: the runtime (no torch) reports parity through the same code. Thresholds are the
defaults of shared/DESIGN.md, overridable per build. ``ParityReport`` is typed whole, including
what the build attaches to it (per-graph rows, INT8 layer drift, FP16 checks, the language model),
and ``to_dict`` is ``parity.json``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from typing_extensions import NotRequired, TypedDict

from ccra_export.core.errors import ConfigError
from ccra_export.core.manifest_schema import LanguageModelParity, LogitsFigures, ParityInputs

PYTORCH_REFERENCE = "PyTorch fp32 (ccra_export.model.vision_model)"
RECORDED_REFERENCE = "PyTorch fp32 outputs recorded at build time (reference.npz)"

#: |a - b| / max(|b|, REL_ERR_FLOOR * max|b|): relative error without blowing up on zeros.
REL_ERR_FLOOR = 1e-3


def _finite_in(value: object, low: float, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and low <= value <= high


@dataclass(frozen=True)
class Thresholds:
    """Pass criteria for one output. ``None`` disables a check."""

    min_cosine: float
    max_scaled_abs_err: float | None = None  # max|a - b| / max|b|
    allow_nonfinite: bool = False
    #: the worst visual token of any image: its cosine, and ||a_t - b_t|| / ||b_t|| (a cosine over the
    #: whole output averages one broken token away); checked on ``visual_tokens`` outputs
    min_token_cosine: float | None = None
    max_token_rel_err: float | None = None

    def __post_init__(self) -> None:
        # Every comparison with NaN is False: a NaN threshold would pass any error, so refuse it here,
        # where flags, the Python API and manifests all arrive.
        if not _finite_in(self.min_cosine, -1.0, 1.0):
            raise ConfigError(f"{self.min_cosine!r}; expected a finite number in [-1, 1]", field="min_cosine")
        if self.max_scaled_abs_err is not None and not _finite_in(self.max_scaled_abs_err, 0.0, math.inf):
            raise ConfigError(f"{self.max_scaled_abs_err!r}; expected a finite number >= 0", field="max_abs_err")
        if self.min_token_cosine is not None and not _finite_in(self.min_token_cosine, -1.0, 1.0):
            raise ConfigError(
                f"{self.min_token_cosine!r}; expected a finite number in [-1, 1]", field="min_token_cosine"
            )
        if self.max_token_rel_err is not None and not _finite_in(self.max_token_rel_err, 0.0, math.inf):
            raise ConfigError(f"{self.max_token_rel_err!r}; expected a finite number >= 0", field="max_token_rel_err")

    def with_overrides(self, *, min_cosine: float | None = None, max_scaled_abs_err: float | None = None) -> Thresholds:
        return dataclasses.replace(
            self,
            min_cosine=self.min_cosine if min_cosine is None else min_cosine,
            max_scaled_abs_err=self.max_scaled_abs_err if max_scaled_abs_err is None else max_scaled_abs_err,
        )


#: per-token bounds from measurements (docs/parity.md): the demo and the tiny preset reach worst-token cosine
#: 1.0 / 1.0 / 0.982 and relative error ~1e-6 / 0.0016 / 0.19 at fp32 / fp16 / int8
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(min_cosine=0.99999, max_scaled_abs_err=1e-4, min_token_cosine=0.99999, max_token_rel_err=1e-3),
    "fp16": Thresholds(min_cosine=0.999, min_token_cosine=0.995, max_token_rel_err=0.05),
    "int8": Thresholds(min_cosine=0.99, min_token_cosine=0.95, max_token_rel_err=0.35),
}

#: the outputs whose rows are visual tokens ([batch, tokens, width]): the per-token checks apply
TOKEN_OUTPUTS = ("visual_tokens",)


def thresholds_for(precision: str) -> Thresholds:
    return DEFAULT_THRESHOLDS[precision]


@dataclass
class OutputParity:
    name: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    scaled_max_abs_err: float
    cosine: float
    nonfinite: int
    reference_scale: float
    thresholds: Thresholds
    failures: list[str] = field(default_factory=list)
    worst_token_cosine: float | None = None  #: visual tokens: the lowest cosine of any one token
    worst_token_rel_err: float | None = None  #: visual tokens: the largest ||a_t - b_t|| / ||b_t||

    @property
    def passed(self) -> bool:
        return not self.failures


def compare_output(name: str, actual: np.ndarray, reference: np.ndarray, thresholds: Thresholds) -> OutputParity:
    """Metrics of ``actual`` (the artifact) against ``reference`` (PyTorch), in float64."""
    if actual.shape != reference.shape:
        return OutputParity(
            name,
            tuple(actual.shape),
            np.inf,
            np.inf,
            np.inf,
            0.0,
            0,
            0.0,
            thresholds,
            [f"shape {tuple(actual.shape)} != reference {tuple(reference.shape)}"],
        )
    a = np.asarray(actual, dtype=np.float64).ravel()
    b = np.asarray(reference, dtype=np.float64).ravel()
    finite = np.isfinite(a)
    nonfinite = int(a.size - finite.sum())
    a, b = a[finite], b[finite]
    diff = np.abs(a - b)
    scale = float(np.abs(b).max()) if b.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    floor = max(REL_ERR_FLOOR * scale, np.finfo(np.float64).tiny)
    max_rel = float((diff / np.maximum(np.abs(b), floor)).max()) if diff.size else 0.0
    scaled = max_abs / scale if scale > 0 else max_abs
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b / norms) if norms > 0 else float(max_abs == 0.0)

    failures = []
    if nonfinite and not thresholds.allow_nonfinite:
        failures.append(f"{nonfinite} NaN/Inf values")
    if cosine < thresholds.min_cosine:
        failures.append(f"cosine {cosine:.7f} < {thresholds.min_cosine}")
    if thresholds.max_scaled_abs_err is not None and scaled > thresholds.max_scaled_abs_err:
        failures.append(f"max abs error / output scale {scaled:.2e} > {thresholds.max_scaled_abs_err:.0e}")
    token_cosine = token_rel = None
    if name.rsplit(": ", 1)[-1] in TOKEN_OUTPUTS and actual.ndim == 3:
        token_cosine, token_rel = worst_token(actual, reference)
        if thresholds.min_token_cosine is not None and token_cosine < thresholds.min_token_cosine:
            failures.append(f"worst visual token cosine {token_cosine:.5f} < {thresholds.min_token_cosine}")
        if thresholds.max_token_rel_err is not None and token_rel > thresholds.max_token_rel_err:
            failures.append(f"worst visual token relative error {token_rel:.3e} > {thresholds.max_token_rel_err:g}")
    return OutputParity(
        name,
        tuple(actual.shape),
        max_abs,
        max_rel,
        scaled,
        cosine,
        nonfinite,
        scale,
        thresholds,
        failures,
        token_cosine,
        token_rel,
    )


def worst_token(actual: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Over every image's tokens ([batch, tokens, width]): the lowest per-token cosine and the largest
    per-token relative error ||a_t - b_t|| / ||b_t|| (a NaN token counts as the worst: cosine -1)."""
    a = np.asarray(actual, dtype=np.float64).reshape(-1, actual.shape[-1])
    b = np.asarray(reference, dtype=np.float64).reshape(-1, reference.shape[-1])
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    tiny = np.finfo(np.float64).tiny
    with np.errstate(invalid="ignore", over="ignore"):
        cosine = (a * b).sum(axis=1) / np.maximum(norm_a * norm_b, tiny)
        both_zero = (norm_a == 0) & (norm_b == 0)
        cosine = np.where(both_zero, 1.0, cosine)
        rel = np.linalg.norm(a - b, axis=1) / np.maximum(norm_b, tiny)
    cosine = np.where(np.isfinite(cosine), cosine, -1.0)
    rel = np.where(np.isfinite(rel), rel, np.inf)
    return float(cosine.min()), float(rel.max())


@dataclass
class LayerDrift:
    """INT8: one tap (an encoder layer's output, the CCRA module, the visual tokens) against the
    FP32 graph on the same inputs (``calibration.layer_report``)."""

    label: str
    tensor: str
    cosine: float
    scaled_max_abs_err: float


class KeptFP32(TypedDict):
    """FP16: a tensor over FP16's safe range on the parity inputs, kept FP32 with its nodes."""

    tensor: str
    max_abs: float
    nodes: list[str]
    graph: NotRequired[str]  # a split bundle: the graph file it is in


class EmulatedOutput(TypedDict):
    cosine: float
    nonfinite: int
    passed: bool


class EmulatedFP16(TypedDict):
    """FP16 arithmetic emulated by PyTorch in half on the CPU, per output: with the graph's FP32
    islands (gates the build) and with none (what weak typing risks; reported)."""

    method: str
    fp32_modules: list[str]
    graph_islands: dict[str, EmulatedOutput]
    no_islands: dict[str, EmulatedOutput]


class LanguageModelFigures(TypedDict):
    """The decoder on the recorded prompt against Hugging Face's logits and greedy tokens."""

    first_token_logits: LogitsFigures
    greedy_steps: int
    tokens_agreeing: int
    identical_prefix: int
    tokens: list[int]
    reference_tokens: list[int]
    #: teacher-forced next-token figures (core/lm_quality.NextTokenFigures), where the reference
    #: recorded its log-probabilities (bundles built before them have none)
    next_token: NotRequired[dict[str, float]]
    #: the decoder's KV cache, "fp" or "int8" (build --kv-cache): what its bounds are with the precision
    kv_cache: NotRequired[str]


class LanguageModelReport(LanguageModelFigures):
    """``--lm-precision``: the figures, what they were measured against and where they ran; `check`
    adds the build's own figures (``built``) to compare with."""

    reference: str
    precision: NotRequired[str]  #: the decoder's weights: what its bounds are (older reports lack it)
    device: str
    ran_on: str
    built: NotRequired[LanguageModelParity]


@dataclass
class ParityReport:
    """Parity of every graph output for one set of inputs."""

    precision: str
    backend: str
    outputs: list[OutputParity]
    inputs: ParityInputs = field(default_factory=lambda: ParityInputs())
    layers: list[LayerDrift] | None = None  # INT8: per-layer drift against the FP32 graph(s)
    first_drift: str | None = None  # INT8: the first layer below the threshold
    language_model: LanguageModelReport | None = None  # --lm-precision: decoder vs transformers
    extra_failures: list[str] = field(default_factory=list)
    reference: str = PYTORCH_REFERENCE
    fp16_kept_fp32: list[KeptFP32] | None = None  # FP16: tensors over FP16's safe range, kept FP32
    emulated_fp16: EmulatedFP16 | None = None  # FP16: the reference computed in half on the CPU
    #: split bundles: each graph on its own, against PyTorch's same stage on the same inputs
    graphs: dict[str, list[OutputParity]] | None = None

    @property
    def passed(self) -> bool:
        graphs_pass = all(o.passed for rows in (self.graphs or {}).values() for o in rows)
        return all(o.passed for o in self.outputs) and graphs_pass and not self.extra_failures

    def failure_summary(self) -> str:
        parts = [f"{o.name}: {', '.join(o.failures)}" for o in self.outputs if o.failures]
        parts += [
            f"{graph} graph, {o.name}: {', '.join(o.failures)}"
            for graph, rows in (self.graphs or {}).items()
            for o in rows
            if o.failures
        ]
        return "; ".join(parts + self.extra_failures)

    def to_dict(self) -> dict[str, Any]:
        layers = None
        if self.layers is not None:
            layers = {
                "reference": "FP32 ONNX graph (its outputs match PyTorch: see outputs above)",
                "first_drifting_layer": self.first_drift,
                "rows": [dataclasses.asdict(row) for row in self.layers],
            }
        return {
            "passed": self.passed,
            "precision": self.precision,
            "backend": self.backend,
            "reference": self.reference,
            "rel_err_floor": f"{REL_ERR_FLOOR} * max|reference|",
            "inputs": self.inputs,
            "outputs": [_output_dict(o) for o in self.outputs],
            **(
                {"graphs": {name: [_output_dict(o) for o in rows] for name, rows in self.graphs.items()}}
                if self.graphs is not None
                else {}
            ),
            **({"layers": layers} if layers is not None else {}),
            **({"language_model": self.language_model} if self.language_model is not None else {}),
            **({"fp16_kept_fp32": self.fp16_kept_fp32} if self.fp16_kept_fp32 is not None else {}),
            **({"emulated_fp16": self.emulated_fp16} if self.emulated_fp16 is not None else {}),
            **({"failures": self.extra_failures} if self.extra_failures else {}),
        }


def _output_dict(o: OutputParity) -> dict[str, Any]:
    return {
        "name": o.name,
        "shape": list(o.shape),
        "max_abs_err": o.max_abs_err,
        "max_rel_err": o.max_rel_err,
        "scaled_max_abs_err": o.scaled_max_abs_err,
        "cosine": o.cosine,
        **(
            {"worst_token_cosine": o.worst_token_cosine, "worst_token_rel_err": o.worst_token_rel_err}
            if o.worst_token_cosine is not None
            else {}
        ),
        "nonfinite": o.nonfinite,
        "reference_scale": o.reference_scale,
        "thresholds": dataclasses.asdict(o.thresholds),
        "passed": o.passed,
        "failures": o.failures,
    }


def compare_outputs(
    actual: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    precision: str,
    backend: str,
    thresholds: Thresholds,
    inputs: ParityInputs | None = None,
    reference_name: str = PYTORCH_REFERENCE,
) -> ParityReport:
    outputs = [compare_output(name, actual[name], reference[name], thresholds) for name in reference]
    return ParityReport(precision, backend, outputs, inputs or ParityInputs(), reference=reference_name)
