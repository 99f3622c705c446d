"""The language model's parity figures, computed the same way at build time and by `check`.

At build, Hugging Face's FP32 model answers a fixed prompt (rows of the embedding table); its
first-token logits and greedy tokens are recorded in ``lm/reference.npz`` with our decoder's own
tokens. `check` (no torch needed, as on a Jetson) reruns our decoder on that prompt and compares
with both: the Hugging Face figures say how close the quantized decoder is, our build-time tokens
say whether it still computes what it computed when it was built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ccra_export.core.errors import BundleError
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


def save_reference(path: Path, prompt_ids: np.ndarray, logits: np.ndarray, tokens: list[int]) -> None:
    np.savez(path, prompt_ids=prompt_ids.astype(np.int64), logits=logits.astype(np.float32), tokens=np.int64(tokens))


def figures(lm: LanguageModel, reference: Path) -> LanguageModelFigures:
    """Our decoder on the recorded prompt against the recorded Hugging Face logits and tokens."""
    try:
        with np.load(reference, allow_pickle=False) as data:
            prompt_ids, want_logits, want = data["prompt_ids"], data["logits"], data["tokens"].tolist()
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{reference}: unreadable language-model reference ({exc})") from None
    got = lm.generate(lm.embed(prompt_ids), Sampling(max_new_tokens=len(want)))  # no stop ids: every step
    logits = compare_output("first_token_logits", got.first_logits, want_logits, thresholds_for("fp32"))
    pairs = list(zip(got.tokens, want, strict=False))
    return LanguageModelFigures(
        first_token_logits=LogitsFigures(cosine=logits.cosine, max_abs_err=logits.max_abs_err),
        greedy_steps=len(want),
        tokens_agreeing=sum(a == b for a, b in pairs),
        identical_prefix=next((i for i, (a, b) in enumerate(pairs) if a != b), len(want)),
        tokens=got.tokens,
        reference_tokens=want,
    )


def failures(precision: str, now: LanguageModelReport, built: LanguageModelParity | None = None) -> list[str]:
    """What fails: FP32 must reproduce Hugging Face's greedy tokens; a rerun on the device class the
    build ran on must reproduce the build's own tokens and first-token cosine."""
    found = []
    if precision == "fp32" and now["tokens_agreeing"] != now["greedy_steps"]:
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
