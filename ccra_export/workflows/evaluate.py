"""`ccra-export eval`: a bundle's answers against PyTorch's and the truth, item by item.

For each question about a picture, the bundle (its vision graphs, its quantized decoder) and the
PyTorch FP32 reference (the checkpoint's CCRA vision model feeding Hugging Face's language model,
model/reference_vlm.py) answer greedily. Reported, as the field reports quantized models: answer
flips (a changed answer, whatever the accuracy says: arXiv 2407.09141), the accuracy of both
against the given answers, teacher-forced next-token KL / top-1 / Δp on the reference's answer
tokens (core/lm_quality.py), and the worst visual token's cosine. The bounds are the build's:
the language model's per decoder precision, the vision graph's per vision precision; a failure is
exit 3, as for parity.

Where PyTorch is absent (a Jetson), the bundle's own evaluation set (the demo task's held-out
pictures and questions, written into the bundle at build) is compared with PyTorch's answers
recorded then: the answer tokens, their log-probabilities and the prompt the decoder read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ccra_export.core import shapes
from ccra_export.core.console import SILENT, Steps
from ccra_export.core.errors import BundleError, CheckpointError, ConfigError, no_language_model
from ccra_export.core.extras import available, require
from ccra_export.core.lm_quality import NextTokenFigures, bounds_for, log_softmax, next_token_figures, violations
from ccra_export.core.manifest import bundle_path, read_manifest, verify_files
from ccra_export.core.manifest_schema import EvaluationRecord
from ccra_export.core.parity import worst_token
from ccra_export.runtime.inputs import InputError, load_image
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline, Prepared
from ccra_export.workflows.parity import ParityOptions, thresholds
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
    worst_token_cosine: float | None  #: the prompt's worst position (a visual token or the text around it)
    worst_token_rel_err: float | None  #: None: the reference's prompt was not recorded (a large model)


@dataclass
class EvalReport:
    bundle: str
    reference: str
    lm_precision: str
    vision_precision: str
    items: list[ItemResult]
    next_token: NextTokenFigures  #: the decoder alone (the reference's prompt fed) where recorded, else end to end
    failures: list[str] = field(default_factory=list)
    end_to_end: NextTokenFigures | None = None  #: our prompt fed: the vision graph's error included
    decoder_only: bool = False
    flip_limit: float = 0.0
    kv_cache: str = "fp"  #: the decoder's KV cache (build --kv-cache): its bounds go with lm_precision's

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
    def worst_token_cosine(self) -> float | None:
        """The prompt's worst position over every item; None where the prompts were not recorded."""
        measured = [i.worst_token_cosine for i in self.items if i.worst_token_cosine is not None]
        return min(measured) if measured else None

    @property
    def worst_token_rel_err(self) -> float | None:
        measured = [i.worst_token_rel_err for i in self.items if i.worst_token_rel_err is not None]
        return max(measured) if measured else None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "reference": self.reference,
            "lm_precision": self.lm_precision,
            "kv_cache": self.kv_cache,
            "vision_precision": self.vision_precision,
            "items": len(self.items),
            "flip_rate": self.flip_rate,
            "accuracy": {"bundle": self.accuracy("ours"), "reference": self.accuracy("reference")},
            "next_token": self.next_token.as_dict(),
            "next_token_measures": "the decoder alone" if self.decoder_only else "end to end",
            "end_to_end": None if self.end_to_end is None else self.end_to_end.as_dict(),
            "flip_limit": self.flip_limit,
            "worst_token_cosine": self.worst_token_cosine,
            "worst_token_rel_err": self.worst_token_rel_err,
            "passed": self.passed,
            "failures": self.failures,
            "per_item": [asdict(i) for i in self.items],
        }


#: the bundle's own evaluation set: the shapes task's held-out seed, two questions per picture
EVAL_DIR = "eval"
EVAL_IMAGES = 8
EVAL_SEED = 4242
EVAL_MAX_NEW_TOKENS = 16
#: the recorded prompts (the decoder's input embeddings) are kept when they fit in this (a 7B
#: model's are ~5 MB a question); past it only the answers are recorded, and eval says so
MAX_RECORDED_PROMPT_BYTES = 16 * 2**20
REFERENCE_FILE = "reference.npz"


@dataclass
class ReferenceAnswer:
    """What the reference said about one item: the answer, its tokens with their next-token
    log-probabilities ([tokens, vocab], teacher-forced), and the prompt it read (None: not recorded)."""

    text: str
    tokens: list[int]
    logits: np.ndarray
    prompt: np.ndarray | None
    position: int
    count: int


class PyTorchReference:
    """PyTorch FP32 (model/reference_vlm.py), computed now."""

    name = "PyTorch FP32 (checkpoint)"

    def __init__(self, checkpoint: str, weights_sha256: str | None, max_new_tokens: int, steps: Steps) -> None:
        require("export", "comparing with PyTorch", field="model")
        from ccra_export.model.reference_vlm import ReferenceVLM

        with steps.step("Loading the PyTorch reference"):
            self.model = ReferenceVLM.from_checkpoint(checkpoint)
        if weights_sha256 is not None and self.model.weights_sha256 != weights_sha256:
            raise CheckpointError(
                "weights differ from the ones this bundle was built from (sha256 mismatch)",
                field="model",
                value=checkpoint,
            )
        self.max_new_tokens = max_new_tokens

    def answer(self, index: int, image: Image.Image, question: str) -> ReferenceAnswer:
        want = self.model.answer(image, question, self.max_new_tokens)
        logits = self.model.teacher_forced(image, question, want.tokens)[-len(want.tokens) :]
        prompt, position, count = self.model.prompt_embeds(image, question)
        return ReferenceAnswer(want.text, want.tokens, logits, prompt, position, count)


class RecordedReference:
    """PyTorch FP32's answers to the bundle's evaluation set, recorded at build (no PyTorch needed)."""

    name = "PyTorch FP32, recorded at build"

    def __init__(self, path: Path, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        try:
            with np.load(path, allow_pickle=False) as data:
                self.arrays = {key: data[key] for key in data.files}
            self.texts = json.loads(str(self.arrays["texts"]))
        except (OSError, ValueError, KeyError, RecursionError) as exc:
            raise BundleError(f"unreadable evaluation reference ({exc})", field="bundle", value=path) from None

    def answer(self, index: int, image: Image.Image, question: str) -> ReferenceAnswer:
        """Item ``index`` as recorded; its arrays are checked (a bundle is a trust boundary)."""
        tokens, logits = self.arrays.get(f"tokens_{index}"), self.arrays.get(f"logprobs_{index}")
        layout, prompt = self.arrays.get(f"layout_{index}"), self.arrays.get(f"prompt_{index}")
        texts = self.texts if isinstance(self.texts, list) else []
        fine = (
            index < len(texts)
            and isinstance(texts[index], str)
            and tokens is not None
            and tokens.ndim == 1
            and tokens.dtype.kind == "i"
            and 1 <= len(tokens) <= self.max_new_tokens
            and logits is not None
            and logits.ndim == 2
            and logits.dtype.kind == "f"
            and logits.shape[0] == len(tokens)
            and bool((tokens >= 0).all() and (tokens < logits.shape[1]).all())
            and layout is not None
            and layout.shape == (2,)
            and layout.dtype.kind == "i"
            and (prompt is None or (prompt.ndim == 2 and prompt.dtype.kind == "f"))
        )
        if not fine:
            raise BundleError(f"evaluation reference: item {index} is missing or malformed", field="bundle")
        return ReferenceAnswer(
            texts[index],
            tokens.tolist(),
            logits,
            None if prompt is None else prompt[None],
            int(layout[0]),
            int(layout[1]),
        )


def record_evaluation_set(checkpoint: Path, stage: Path, steps: Steps = SILENT) -> EvaluationRecord:
    """At build: the evaluation set into ``stage/eval`` and PyTorch FP32's answers to it."""
    data = shapes.write_dataset(stage / EVAL_DIR, images=EVAL_IMAGES, seed=EVAL_SEED)
    items = read_items(data)
    reference = PyTorchReference(str(checkpoint), None, EVAL_MAX_NEW_TOKENS, SILENT)
    arrays: dict[str, np.ndarray] = {}
    texts, prompts = [], {}
    with steps.step(f"Recording PyTorch's answers to the bundle's evaluation set ({len(items)} questions)"):
        for index, item in enumerate(items):
            answer = reference.answer(index, load_image(item.image), item.question)
            texts.append(answer.text)
            arrays[f"tokens_{index}"] = np.asarray(answer.tokens, np.int64)
            arrays[f"logprobs_{index}"] = log_softmax(answer.logits).astype(np.float32)
            arrays[f"layout_{index}"] = np.asarray([answer.position, answer.count], np.int64)
            if answer.prompt is not None:
                prompts[f"prompt_{index}"] = answer.prompt[0].astype(np.float32)
    if sum(a.nbytes for a in prompts.values()) <= MAX_RECORDED_PROMPT_BYTES:
        arrays.update(prompts)
    np.savez(stage / EVAL_DIR / REFERENCE_FILE, texts=np.asarray(json.dumps(texts)), **arrays)
    return EvaluationRecord(
        data=f"{EVAL_DIR}/{data.name}",
        reference=f"{EVAL_DIR}/{REFERENCE_FILE}",
        items=len(items),
        max_new_tokens=EVAL_MAX_NEW_TOKENS,
    )


#: answers flip for the vision graph's own error too: how many a vision precision may add
VISION_FLIP_ALLOWANCE = {"fp32": 0.0, "fp16": 0.02, "int8": 0.05}


def evaluate(
    bundle: Path,
    data: Path | None = None,
    *,
    model: str | None = None,
    reference: str = "auto",
    limit: int | None = None,
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
    backend: str = "auto",
    steps: Steps = SILENT,
) -> EvalReport:
    """Every item of ``data`` (default: the bundle's own evaluation set) through the bundle and the
    PyTorch reference: computed now (``pytorch``; ``model``, the checkpoint the bundle was built
    from; a demo bundle finds the shipped one), or recorded at build (``recorded``: the bundle's own
    set only). ``auto``: PyTorch where it and the checkpoint are at hand, else the recorded answers."""
    if reference not in ("auto", "pytorch", "recorded"):
        raise ConfigError("expected auto, pytorch or recorded", field="reference", value=reference)
    manifest = read_manifest(bundle)
    record = manifest["language_model"]
    if not record:
        raise no_language_model(bundle)
    evaluation = record.get("evaluation")
    if evaluation is None and (data is None or reference == "recorded"):
        raise BundleError(
            "holds no evaluation set or recorded answers (built before eval): evaluate a question set of "
            "your own against PyTorch (the export extra and the checkpoint)",
            field="bundle",
            value=bundle,
        )
    if data is None and evaluation is not None:
        data = bundle_path(bundle, evaluation["data"], "language_model.evaluation.data")
    own_set = evaluation is not None and Path(data).resolve() == (Path(bundle) / evaluation["data"]).resolve()
    checkpoint = reference_checkpoint(manifest, model)
    if reference == "auto":
        at_hand = available("export") and checkpoint is not None and manifest["source"]["kind"] == "checkpoint"
        reference = "pytorch" if at_hand or not own_set else "recorded"
    if reference == "recorded" and not own_set:
        raise ConfigError(
            "the recorded answers are for the bundle's own evaluation set; a question set of your own needs "
            "PyTorch's (the export extra and the checkpoint)",
            field="reference",
            value="recorded",
        )
    items = read_items(data, limit)
    if reference == "recorded" and evaluation is not None:  # own_set: the recorded answers are for it
        recorded_tokens = evaluation.get("max_new_tokens", EVAL_MAX_NEW_TOKENS)
        if max_new_tokens != recorded_tokens:
            raise ConfigError(
                f"the recorded answers were generated with up to {recorded_tokens} new tokens; compare with the same",
                field="max_new_tokens",
                value=max_new_tokens,
            )
        files = [evaluation["reference"], evaluation["data"], *(str(Path(EVAL_DIR) / i.image.name) for i in items)]
        verify_files(bundle, manifest, {name for name in files if name in manifest["files"]})
        answers: PyTorchReference | RecordedReference = RecordedReference(
            bundle_path(bundle, evaluation["reference"], "language_model.evaluation.reference"), recorded_tokens
        )
    else:
        if checkpoint is None or manifest["source"]["kind"] != "checkpoint":
            raise CheckpointError(
                "the checkpoint this bundle was built from is needed for PyTorch's answers",
                field="model",
                value=checkpoint,
            )
        answers = PyTorchReference(checkpoint, manifest["source"]["weights_sha256"], max_new_tokens, steps)
    with steps.step("Loading the bundle"):
        pipeline = Pipeline.from_bundle(bundle, backend=backend)
    results, decoder_figures, end_to_end = [], [], []
    with steps.progress(f"Answering {len(items)} questions: the bundle and {answers.name}", len(items), "") as advance:
        for index, item in enumerate(items):
            image = load_image(item.image)
            want = answers.answer(index, image, item.question)
            sampling = Sampling(max_new_tokens=max_new_tokens, stop_ids=pipeline.lm.eos_ids)
            ours, _, prepared = pipeline.generate_tokens(image, item.question, sampling)
            tokens = np.asarray(want.tokens)
            # end to end: our prompt (our vision graph, our splice) and the reference's answer fed
            end_to_end.append(
                next_token_figures(want.logits, pipeline.lm.answer_logits(prepared.inputs_embeds, want.tokens), tokens)
            )
            token_cosine = token_rel = None
            if want.prompt is not None:  # the decoder alone: the reference's own prompt fed to ours
                decoder_figures.append(
                    next_token_figures(want.logits, pipeline.lm.answer_logits(want.prompt, want.tokens), tokens)
                )
                token_cosine, token_rel = prompt_parity(prepared, want.prompt, want.position, want.count)
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
    figures = pooled(decoder_figures or end_to_end)
    report = EvalReport(str(bundle), answers.name, record["precision"], manifest["precision"], results, figures)
    report.end_to_end = pooled(end_to_end)
    report.decoder_only = bool(decoder_figures)
    decoder = record.get("decoder")
    report.kv_cache = decoder["kv_cache"] if decoder else "fp"
    lm_bounds = bounds_for(record["precision"], report.kv_cache)
    flip_limit = lm_bounds.max_flip_rate + VISION_FLIP_ALLOWANCE[manifest["precision"]]
    report.failures += [f"language model: {v}" for v in violations(figures, None, lm_bounds)]
    if report.flip_rate > flip_limit:
        report.failures.append(f"answers flipped {report.flip_rate:.3f} > {flip_limit:g}")
    vision = thresholds(manifest["precision"], ParityOptions(), manifest["parity"]["thresholds"])
    worst, rel = report.worst_token_cosine, report.worst_token_rel_err
    if vision.min_token_cosine is not None and worst is not None and worst < vision.min_token_cosine:
        report.failures.append(
            f"prompt: worst position cosine {worst:.5f} < {vision.min_token_cosine} "
            "(the visual tokens and the text spliced around them, against PyTorch's)"
        )
    if vision.max_token_rel_err is not None and rel is not None and rel > vision.max_token_rel_err:
        report.failures.append(f"prompt: worst position relative error {rel:.3e} > {vision.max_token_rel_err:g}")
    report.flip_limit = flip_limit
    return report


def pooled(items: list[NextTokenFigures]) -> NextTokenFigures:
    """Per-item figures pooled over every position (means weighted by positions; p99 approximated
    by the largest item p99, an upper bound; worst cases as worst)."""
    positions = sum(f.positions for f in items)
    confident = sum(f.confident_positions for f in items)
    agreeing = sum((f.confident_top1_agreement or 0.0) * f.confident_positions for f in items)
    return NextTokenFigures(
        positions=positions,
        kl_mean=sum(f.kl_mean * f.positions for f in items) / positions,
        kl_p99=max(f.kl_p99 for f in items),
        kl_max=max(f.kl_max for f in items),
        top1_agreement=sum(f.top1_agreement * f.positions for f in items) / positions,
        delta_p_mean=sum(f.delta_p_mean * f.positions for f in items) / positions,
        delta_p_min=min(f.delta_p_min for f in items),
        confident_positions=confident,
        confident_top1_agreement=agreeing / confident if confident else None,
        nonfinite_positions=sum(f.nonfinite_positions for f in items),
    )
