"""The language model's parity figures, computed the same way at build time and by `check`.

At build, Hugging Face's FP32 model answers a fixed prompt (rows of the embedding table); its
first-token logits, greedy tokens and, teacher-forced on those tokens, its next-token
log-probabilities at every answer position are recorded in ``lm/reference.npz``. `check` (no
torch needed, as on a Jetson) reruns our decoder on that prompt and compares with both: the
teacher-forced figures (next-token KL divergence, top-1 agreement, Δp; core/lm_quality.py) are
bounded per precision, our build-time tokens say whether it still computes what it computed when
it was built. A bundle recorded before the teacher-forced figures reports them as not recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ccra_export.core.errors import BundleError
from ccra_export.core.lm_quality import (
    NextTokenFigures,
    bounds_for,
    log_softmax,
    next_token_figures,
    violations,
)
from ccra_export.core.manifest_schema import LanguageModelParity, LogitsFigures
from ccra_export.core.parity import LanguageModelFigures, LanguageModelReport, compare_output, thresholds_for
from ccra_export.runtime.language_model import LanguageModel, Sampling
from ccra_export.runtime.vision_backend import available_providers

LM_REFERENCE_FILE = "lm/reference.npz"
#: how far `check`'s first-token cosine may move from the build's on the same device class
COSINE_DRIFT = 1e-4


def runnable_device(device: str) -> str:
    """Where a decoder built for ``device`` runs here: its device, or the CPU without CUDA."""
    return device if device == "cpu" or "CUDAExecutionProvider" in available_providers() else "cpu"


def save_reference(
    path: Path, prompt_ids: np.ndarray, logits: np.ndarray, tokens: list[int], forced_logits: np.ndarray
) -> None:
    """``forced_logits``: [len(tokens), vocab], the reference's next-token logits at each answer
    position with its own tokens fed (teacher forcing); stored as log-probabilities."""
    np.savez(
        path,
        prompt_ids=prompt_ids.astype(np.int64),
        logits=logits.astype(np.float32),
        tokens=np.int64(tokens),
        forced_logprobs=log_softmax(forced_logits).astype(np.float32),
    )


def figures(lm: LanguageModel, reference: Path) -> LanguageModelFigures:
    """Our decoder on the recorded prompt against the recorded Hugging Face logits and tokens."""
    try:
        with np.load(reference, allow_pickle=False) as data:
            prompt_ids, want_logits, want = data["prompt_ids"], data["logits"], data["tokens"].tolist()
            forced = data["forced_logprobs"] if "forced_logprobs" in data.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{reference}: unreadable language-model reference ({exc})") from None
    if prompt_ids.ndim != 1 or not len(prompt_ids) or not want or want_logits.ndim != 1:
        raise BundleError(f"{reference}: expected a prompt, tokens and one row of logits")
    prompt = lm.embed(prompt_ids)
    if len(prompt_ids) + len(want) - 1 > lm.context_length:
        raise BundleError(
            f"{reference}: a {len(prompt_ids)}-token prompt and {len(want)} tokens exceed the decoder's context "
            f"of {lm.context_length}"
        )
    got = lm.generate(prompt, Sampling(max_new_tokens=len(want)))  # no stop ids: every step
    logits = compare_output("first_token_logits", got.first_logits, want_logits, thresholds_for("fp32"))
    pairs = list(zip(got.tokens, want, strict=False))
    figures = LanguageModelFigures(
        first_token_logits=LogitsFigures(cosine=logits.cosine, max_abs_err=logits.max_abs_err),
        greedy_steps=len(want),
        tokens_agreeing=sum(a == b for a, b in pairs),
        identical_prefix=next((i for i, (a, b) in enumerate(pairs) if a != b), len(want)),
        tokens=got.tokens,
        reference_tokens=want,
        kv_cache=kv_cache(lm),
    )
    if forced is not None:
        if forced.ndim != 2 or forced.shape != (len(want), want_logits.shape[-1]):
            raise BundleError(f"{reference}: forced_logprobs {forced.shape}, expected ({len(want)}, vocab)")
        figures["next_token"] = teacher_forced(lm, prompt, want, forced).as_dict()
    return figures


def kv_cache(lm: LanguageModel) -> str:
    """The decoder's KV cache as the build names it: int8 (quantized by the builder) or fp."""
    return "int8" if np.dtype(lm.kv_dtype) == np.int8 else "fp"


def teacher_forced(lm: LanguageModel, prompt: np.ndarray, answer: list[int], reference: np.ndarray) -> NextTokenFigures:
    """Our next-token distributions at each answer position, the reference's answer fed, against the
    reference's (``reference``: [len(answer), vocab] logits or log-probabilities)."""
    return next_token_figures(reference, lm.answer_logits(prompt, answer), np.asarray(answer))


def failures(precision: str, now: LanguageModelReport, built: LanguageModelParity | None = None) -> list[str]:
    """What fails: FP32 must reproduce Hugging Face's greedy tokens (with its own KV cache: an INT8
    one legitimately changes a free-running continuation); a rerun on the device class the build ran
    on must reproduce the build's own tokens and first-token cosine."""
    found = []
    kv = now.get("kv_cache", "fp")
    if "next_token" in now:
        figures = NextTokenFigures(**now["next_token"])
        found += [f"language model: {v}" for v in violations(figures, None, bounds_for(precision, kv))]
    if precision == "fp32" and kv == "fp" and now["tokens_agreeing"] != now["greedy_steps"]:
        found.append(f"language model: FP32 greedy tokens differ from transformers at step {now['identical_prefix']}")
    if built is not None and built["ran_on"] == now["ran_on"]:
        if now["tokens"] != built["tokens"]:
            pairs = enumerate(zip(now["tokens"], built["tokens"], strict=False))
            step = next((i for i, (a, b) in pairs if a != b), min(len(now["tokens"]), len(built["tokens"])))
            found.append(f"language model: greedy tokens differ from the build's own at step {step}")
        drift = abs(now["first_token_logits"]["cosine"] - built["first_token_logits"]["cosine"])
        if drift > COSINE_DRIFT:
            found.append(f"language model: first-token cosine moved by {drift:.2e} since the build")
    return found
