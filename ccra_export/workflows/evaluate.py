"""`ccra-export eval`: a bundle's answers against PyTorch's and the truth, item by item.

For each question about a picture, the bundle (its vision graphs, its quantized decoder) and the
PyTorch FP32 reference (the checkpoint's CCRA vision model feeding Hugging Face's language model,
model/reference_vlm.py) answer greedily. Reported, as the field reports quantized models: answer
flips (a changed answer, whatever the accuracy says: arXiv 2407.09141), the accuracy of both
against the given answers, teacher-forced next-token KL / top-1 / Δp on the reference's answer
tokens (core/lm_quality.py), and the worst visual token's cosine. The bounds are the build's:
the language model's per decoder precision, the vision graph's per vision precision; a failure is
exit 3, as for parity.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import CheckpointError, ConfigError, no_language_model
from ccra_export.core.extras import require
from ccra_export.core.lm_quality import NextTokenFigures, bounds_for, next_token_figures, violations
from ccra_export.core.manifest import read_manifest
from ccra_export.core.parity import thresholds_for, worst_token
from ccra_export.runtime.inputs import InputError, load_image
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline, Prepared
from ccra_export.workflows.source import reference_checkpoint

MAX_ITEMS = 100_000
MAX_LINE_BYTES = 64 * 1024


@dataclass(frozen=True)
class EvalItem:
    """One line of the data file: a picture (relative to the file), a question, maybe its answer."""

    image: Path
    question: str
    answer: str | None = None


def read_items(path: Path, limit: int | None = None) -> list[EvalItem]:
    """The JSON Lines file's items (``image``, ``question``, optional ``answer``), at most ``limit``."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise ConfigError(f"{limit}; expected an integer >= 1", field="limit")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"unreadable ({exc})", field="data", value=path) from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if len(line.encode()) > MAX_LINE_BYTES:
            raise InputError(f"a line of over {MAX_LINE_BYTES} bytes", field="data", value=where)
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"not JSON ({exc})", field="data", value=where) from None
        if not isinstance(record, dict):
            raise InputError("expected a JSON object per line", field="data", value=where)
        image, question, answer = record.get("image"), record.get("question"), record.get("answer")
        if not isinstance(image, str) or not image or not isinstance(question, str) or not question.strip():
            raise InputError('expected "image" and "question" strings', field="data", value=where)
        if answer is not None and not isinstance(answer, str):
            raise InputError('"answer": expected a string', field="data", value=where)
        items.append(EvalItem(path.parent / image, question, answer))
        if len(items) == (limit or MAX_ITEMS):
            break
    if not items:
        raise InputError("no items; expected JSON Lines with image and question", field="data", value=path)
    return items


def prompt_parity(prepared: Prepared, reference: np.ndarray, position: int, count: int) -> tuple[float, float]:
    """The worst position of the prompt the decoder reads, ours against PyTorch's: the visual tokens
    (the vision graph's error) and the text around them (the template, the tokenizer, the splice).
    A prompt laid out differently (an image spliced one position off) scores cosine -1."""
    ours = prepared.inputs_embeds.astype(np.float32)
    if ours.shape != reference.shape or (prepared.image_position, prepared.visual_tokens.shape[1]) != (position, count):
        return -1.0, float("inf")
    return worst_token(ours, reference)


def normalise(answer: str) -> str:
    """Answers compared as words: case, surrounding blanks and a final full stop do not count."""
    return answer.strip().rstrip(".").strip().lower()


@dataclass
class ItemResult:
    image: str
    question: str
    expected: str | None
    ours: str
    reference: str
    flipped: bool
    worst_token_cosine: float  #: the prompt's worst position (a visual token or the text around it)
    worst_token_rel_err: float


@dataclass
class EvalReport:
    bundle: str
    reference: str
    lm_precision: str
    vision_precision: str
    items: list[ItemResult]
    next_token: NextTokenFigures
    failures: list[str] = field(default_factory=list)

    @property
    def flip_rate(self) -> float:
        return sum(i.flipped for i in self.items) / len(self.items)

    def accuracy(self, side: str) -> float | None:
        """Share of items whose ``side`` (ours | reference) answer is the given one; None without answers."""
        scored = [i for i in self.items if i.expected is not None]
        if not scored:
            return None
        return sum(normalise(getattr(i, side)) == normalise(i.expected or "") for i in scored) / len(scored)

    @property
    def worst_token_cosine(self) -> float:
        return min(i.worst_token_cosine for i in self.items)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "reference": self.reference,
            "lm_precision": self.lm_precision,
            "vision_precision": self.vision_precision,
            "items": len(self.items),
            "flip_rate": self.flip_rate,
            "accuracy": {"bundle": self.accuracy("ours"), "reference": self.accuracy("reference")},
            "next_token": self.next_token.as_dict(),
            "worst_token_cosine": self.worst_token_cosine,
            "passed": self.passed,
            "failures": self.failures,
            "per_item": [asdict(i) for i in self.items],
        }


def evaluate(
    bundle: Path,
    data: Path,
    *,
    model: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 16,
    backend: str = "auto",
    steps: Steps = SILENT,
) -> EvalReport:
    """Every item of ``data`` through the bundle and the PyTorch reference (``model``: the checkpoint
    the bundle was built from; a demo bundle finds the shipped one)."""
    items = read_items(data, limit)
    manifest = read_manifest(bundle)
    record = manifest["language_model"]
    if not record:
        raise no_language_model(bundle)
    require("export", "comparing with PyTorch", field="model")
    from ccra_export.model.reference_vlm import ReferenceVLM

    checkpoint = reference_checkpoint(manifest, model)
    if checkpoint is None or manifest["source"]["kind"] != "checkpoint":
        raise CheckpointError(
            "the checkpoint this bundle was built from is needed for its PyTorch answers",
            field="model",
            value=checkpoint,
        )
    with steps.step("Loading the PyTorch reference"):
        reference = ReferenceVLM.from_checkpoint(checkpoint)
    if reference.weights_sha256 != manifest["source"]["weights_sha256"]:
        raise CheckpointError(
            "weights differ from the ones this bundle was built from (sha256 mismatch)", field="model", value=checkpoint
        )
    with steps.step("Loading the bundle"):
        pipeline = Pipeline.from_bundle(bundle, backend=backend)
    results, ref_rows, our_rows, following = [], [], [], []
    with steps.progress(f"Answering {len(items)} questions, bundle and PyTorch", len(items), "questions") as advance:
        for item in items:
            image = load_image(item.image)
            want = reference.answer(image, item.question, max_new_tokens)
            sampling = Sampling(max_new_tokens=max_new_tokens, stop_ids=pipeline.lm.eos_ids)
            ours, _, prepared = pipeline.generate_tokens(image, item.question, sampling)
            answer = want.tokens
            ref_rows.append(reference.teacher_forced(image, item.question, answer)[-len(answer) :])
            fed = prepared.inputs_embeds
            if len(answer) > 1:
                fed = np.concatenate([fed, pipeline.lm.embed(answer[:-1])], axis=1)
            our_rows.append(pipeline.lm.teacher_forced_logits(fed)[-len(answer) :])
            following += answer
            token_cosine, token_rel = prompt_parity(prepared, *reference.prompt_embeds(image, item.question))
            results.append(
                ItemResult(
                    str(item.image),
                    item.question,
                    item.answer,
                    ours,
                    want.text,
                    normalise(ours) != normalise(want.text),
                    token_cosine,
                    token_rel,
                )
            )
            advance(1)
    figures = next_token_figures(np.concatenate(ref_rows), np.concatenate(our_rows), np.asarray(following))
    report = EvalReport(
        str(bundle), "PyTorch FP32 (checkpoint)", record["precision"], manifest["precision"], results, figures
    )
    report.failures += [
        f"language model: {v}" for v in violations(figures, report.flip_rate, bounds_for(record["precision"]))
    ]
    vision = thresholds_for(manifest["precision"])
    if vision.min_token_cosine is not None and report.worst_token_cosine < vision.min_token_cosine:
        report.failures.append(
            f"prompt: worst position cosine {report.worst_token_cosine:.5f} < {vision.min_token_cosine} "
            "(the visual tokens and the text spliced around them, against PyTorch's)"
        )
    return report
