"""How close a quantized decoder's next-token distributions are to the full-precision model's.

The figures the field uses for quantized language models (llama.cpp's `llama-perplexity
--kl-divergence`; "Accuracy is Not All You Need", arXiv 2407.09141): per position, teacher-forced
on the same input, the KL divergence KL(P_ref || P_ours) of the next-token distributions, whether
the top-1 token agrees, and Δp, the change of the probability of the token that actually comes
next. A cosine of the first logits hides all of these; a flipped greedy answer is what a user sees.

Pure numpy (float64): it runs where the bundle runs, a Jetson included, against logits recorded at
build time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64 (the maximum subtracted first: no overflow)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


#: the reference's top-token probability from which a position counts as confident
CONFIDENT = 0.5


@dataclass(frozen=True)
class NextTokenFigures:
    """Teacher-forced figures over ``positions`` next-token predictions."""

    positions: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float  #: share of positions whose most likely token is the reference's
    delta_p_mean: float  #: mean change of the next token's probability (negative: ours is less sure)
    delta_p_min: float  #: the largest drop of the next token's probability
    #: positions where the reference is sure of its top token (probability >= CONFIDENT): only there
    #: is a changed top-1 a defect (a near-flat distribution, as a random model's, flips on rounding)
    confident_positions: int = 0
    confident_top1_agreement: float | None = None
    nonfinite_positions: int = 0  #: positions whose logits held NaN/Inf (always a failure)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def next_token_figures(
    reference: np.ndarray, ours: np.ndarray, next_tokens: np.ndarray | None = None
) -> NextTokenFigures:
    """``reference`` and ``ours``: [positions, vocab] logits (or log-probabilities) for the same inputs.
    ``next_tokens``: the token fed after each position (teacher forcing); default the reference's
    argmax, which is what a greedy reference continuation feeds."""
    ref, got = np.atleast_2d(reference), np.atleast_2d(ours)
    if ref.shape != got.shape or ref.ndim != 2 or ref.shape[0] == 0:
        raise ValueError(f"expected two [positions, vocab] arrays of one shape, got {ref.shape} and {got.shape}")
    broken = ~np.isfinite(got).all(axis=-1)  # a NaN/Inf logit (FP16 overflow): no distribution at all
    got = np.where(broken[:, None], 0.0, got)  # scored as a flat distribution, and counted below
    log_ref, log_got = log_softmax(ref), log_softmax(got)
    p_ref = np.exp(log_ref)
    kl = np.maximum((p_ref * (log_ref - log_got)).sum(axis=-1), 0.0)  # >= 0 up to rounding
    top_ref = log_ref.argmax(axis=-1)
    following = top_ref if next_tokens is None else np.asarray(next_tokens, dtype=np.int64)
    rows = np.arange(ref.shape[0])
    delta_p = np.exp(log_got[rows, following]) - p_ref[rows, following]
    agree = log_got.argmax(axis=-1) == top_ref
    confident = p_ref[rows, top_ref] >= CONFIDENT
    return NextTokenFigures(
        positions=int(ref.shape[0]),
        kl_mean=float(kl.mean()),
        kl_p99=float(np.percentile(kl, 99)),
        kl_max=float(kl.max()),
        top1_agreement=float(agree.mean()),
        delta_p_mean=float(delta_p.mean()),
        delta_p_min=float(delta_p.min()),
        confident_positions=int(confident.sum()),
        confident_top1_agreement=float(agree[confident].mean()) if confident.any() else None,
        nonfinite_positions=int(broken.sum()),
    )


@dataclass(frozen=True)
class QualityBounds:
    """What a decoder of one precision must reach against the FP32 reference (teacher-forced)."""

    max_kl_mean: float
    max_kl_p99: float
    min_top1_agreement: float  #: at the reference's confident positions
    max_flip_rate: float  #: share of greedy answers that differ from the reference's

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: {value!r}; expected a finite number >= 0")
        if self.min_top1_agreement > 1 or self.max_flip_rate > 1:
            raise ValueError("min_top1_agreement and max_flip_rate are shares in [0, 1]")


#: Default bounds per decoder precision, from the demo model's measurements (teacher-forced, 32
#: positions; docs/parity.md): KL mean / p99 / top-1 where the reference is sure
#:   fp32 cpu    0        / 0       / 1.0
#:   fp16 cuda   <5e-6    / 5e-5    / 1.0      (the CUDA decoder on the CPU provider)
#:   int8 cpu    2.6e-4   / 4.2e-3  / 1.0      int8 cuda 5e-5 / 7.9e-4 / 1.0
#:   int4 cpu    0.0034   / 0.058   / 1.0      (k_quant_mixed, the default; the builder's default
#:               0.021 / 0.30 / 0.969, rtn 0.037 / 0.47 / 0.938, k_quant 0.041 / 0.41 / 0.969)
#:   int4 cuda   0.0028   / 0.045   / 1.0      (k_quant_mixed)
#:   a random 0.5B-class Llama at int4: KL mean 0.031 (k_quant_mixed) to 0.056 (rtn), p99 <= 0.062
#: Each honest build passes with a margin (int4 rtn on a random 0.5B model is the closest, 1.8x), and
#: a quantization-hostile checkpoint (outlier channels that round-to-nearest INT4 loses) fails at INT4
#: with a mean KL of 2.09 (k_quant_mixed; 5.95 with the builder's default; tests/test_lm_quality.py).
DEFAULT_BOUNDS = {
    "fp32": QualityBounds(max_kl_mean=1e-6, max_kl_p99=1e-5, min_top1_agreement=1.0, max_flip_rate=0.0),
    "fp16": QualityBounds(max_kl_mean=2e-4, max_kl_p99=2e-3, min_top1_agreement=0.97, max_flip_rate=0.02),
    "int8": QualityBounds(max_kl_mean=5e-3, max_kl_p99=5e-2, min_top1_agreement=0.95, max_flip_rate=0.05),
    "int4": QualityBounds(max_kl_mean=0.1, max_kl_p99=1.0, min_top1_agreement=0.9, max_flip_rate=0.10),
}


#: What an INT8 KV cache (build --kv-cache int8, per-channel scales) may add on its own: its figures
#: against the same decoder with an unquantized cache, teacher-forced on that decoder's 32-token
#: answer to the parity prompt. Measured on the demo model (KL mean / p99, top-1 where sure 1.0 in all):
#:   fp32 weights 9.2e-4 / 7.5e-3    int8 1.0e-3 / 1.1e-2    int4 1.4e-3 / 1.6e-2
#:   (per-tensor scales: 3.4e-3 / 3.7e-2, 5.7e-3 / 6.8e-2, 1.6e-3 / 2.1e-2); on the 0.5B-class random
#:   model (INT4) 3.1e-4 / 3.9e-4, and 3.9e-4 / 5.0e-4 at positions 600-664. The bounds are >= 3x the worst.
KV_INT8_BOUNDS = QualityBounds(max_kl_mean=5e-3, max_kl_p99=5e-2, min_top1_agreement=0.95, max_flip_rate=0.05)


def bounds_for(precision: str, kv_cache: str = "fp") -> QualityBounds:
    """The bounds of a decoder of ``precision`` weights; with an INT8 KV cache its error adds to the
    weights': the KL bounds add up, the agreement bounds take the looser of the two."""
    weights = DEFAULT_BOUNDS[precision]
    if kv_cache == "fp":
        return weights
    kv = KV_INT8_BOUNDS
    return QualityBounds(
        max_kl_mean=weights.max_kl_mean + kv.max_kl_mean,
        max_kl_p99=weights.max_kl_p99 + kv.max_kl_p99,
        min_top1_agreement=min(weights.min_top1_agreement, kv.min_top1_agreement),
        max_flip_rate=min(1.0, weights.max_flip_rate + kv.max_flip_rate),
    )


def violations(figures: NextTokenFigures, flip_rate: float | None, bounds: QualityBounds) -> list[str]:
    """Each bound the figures break, as a phrase (empty: within bounds). ``flip_rate``: the share of
    greedy answers that changed, where answers were compared (None: not measured)."""
    found = []
    if figures.nonfinite_positions:
        found.append(f"{figures.nonfinite_positions} positions with NaN/Inf logits")
    if figures.kl_mean > bounds.max_kl_mean:
        found.append(f"mean next-token KL {figures.kl_mean:.3g} > {bounds.max_kl_mean:g}")
    if figures.kl_p99 > bounds.max_kl_p99:
        found.append(f"p99 next-token KL {figures.kl_p99:.3g} > {bounds.max_kl_p99:g}")
    agreement = figures.confident_top1_agreement
    if agreement is not None and agreement < bounds.min_top1_agreement:
        found.append(
            f"top-1 agreement {agreement:.3f} < {bounds.min_top1_agreement:g} "
            f"(at the {figures.confident_positions} positions where the reference is sure)"
        )
    if flip_rate is not None and flip_rate > bounds.max_flip_rate:
        found.append(f"greedy answers flipped {flip_rate:.3f} > {bounds.max_flip_rate:g}")
    return found
