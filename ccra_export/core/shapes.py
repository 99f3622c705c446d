"""The "shapes" task the demo model learned: seeded scenes of coloured shapes and questions about them.

Specified so anyone can regenerate it (issue 23, docs/demo.md): square RGB pictures with a side of
128-512 px on a uniform light background (each channel 200-255), one to three solid,
non-overlapping shapes from {circle, square, triangle (isosceles, apex up)}, each kind at most
once, colours from {red, green, blue, yellow} with each channel 10-40 off the ideal, each shape's
bounding box 18-35% of the side and fully inside the picture. Four question templates, answered
by one lower-case word. numpy and Pillow only: calibration, ``eval`` and the tests use it without
PyTorch. Same seed, same scenes, same pixels, same questions.

    python -m ccra_export.core.shapes --out data/shapes --images 200 --seed 1
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
COUNT_WORDS = ("one", "two", "three")
MIN_SIDE, MAX_SIDE = 128, 512
MIN_BOX, MAX_BOX = 0.18, 0.35  #: a shape's bounding box, as a fraction of the picture's side
COLOR_OFFSET = (10, 40)  #: each channel sits this far from the ideal colour, towards mid-grey
BACKGROUND = (200, 255)

TEMPLATES = {
    "color": "What color is the {kind}?",
    "shape": "What shape is {color}?",
    "count": "How many shapes are there?",
    "exists": "Is there a {color} {kind}?",
}
#: every answer the task has, per template
ANSWERS = {
    "color": tuple(COLORS),
    "shape": KINDS,
    "count": COUNT_WORDS,
    "exists": ("yes", "no"),
}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    rgb: tuple[int, int, int]
    box: tuple[int, int, int, int]  #: left, top, right, bottom in pixels (right/bottom exclusive)


@dataclass(frozen=True)
class Scene:
    side: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    def shape(self, kind: str) -> Shape | None:
        return next((s for s in self.shapes if s.kind == kind), None)

    def with_color(self, color: str) -> list[Shape]:
        return [s for s in self.shapes if s.color == color]


@dataclass(frozen=True)
class Question:
    template: str  #: a key of TEMPLATES
    question: str
    answer: str
    box: tuple[int, int, int, int] | None  #: the asked shape's box, where the question names one


def _color(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    low, high = COLOR_OFFSET
    offsets = rng.integers(low, high + 1, size=3)
    return tuple(int(c - o if c == 255 else c + o) for c, o in zip(COLORS[name], offsets, strict=True))


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def random_scene(rng: np.random.Generator) -> Scene:
    """One scene; boxes never overlap (a placement that would is drawn again)."""
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    background = tuple(int(v) for v in rng.integers(BACKGROUND[0], BACKGROUND[1] + 1, size=3))
    while True:
        count = int(rng.integers(1, 4))
        kinds = [KINDS[i] for i in rng.permutation(len(KINDS))[:count]]
        boxes: list[tuple[int, int, int, int]] = []
        for _ in kinds:
            for _attempt in range(50):
                size = int(rng.integers(round(MIN_BOX * side), int(MAX_BOX * side) + 1))
                left, top = (int(v) for v in rng.integers(0, side - size + 1, size=2))
                box = (left, top, left + size, top + size)
                if not any(_overlaps(box, other) for other in boxes):
                    boxes.append(box)
                    break
        if len(boxes) == count:
            break
    names = list(COLORS)
    shapes = tuple(
        Shape(kind, color, _color(rng, color), box)
        for kind, box, color in zip(kinds, boxes, (names[int(rng.integers(len(names)))] for _ in kinds), strict=True)
    )
    return Scene(side, background, shapes)


def _outline(shape: Shape) -> list[tuple[int, int]] | tuple[int, int, int, int]:
    left, top, right, bottom = shape.box
    if shape.kind == "triangle":  # isosceles, apex up, filling its box
        return [((left + right - 1) / 2, top), (right - 1, bottom - 1), (left, bottom - 1)]
    return (left, top, right - 1, bottom - 1)  # ImageDraw's boxes include their last pixel


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.side, scene.side), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        outline = _outline(shape)
        if shape.kind == "circle":
            draw.ellipse(outline, fill=shape.rgb)
        elif shape.kind == "square":
            draw.rectangle(outline, fill=shape.rgb)
        else:
            draw.polygon(outline, fill=shape.rgb)
    return image


def coverage(scene: Scene, grid: int) -> np.ndarray:
    """[grid*grid, kinds + colours]: the fraction of each grid cell each shape kind and each colour
    covers (the tower's auxiliary warm-up targets; exact pixels of ``render``)."""
    masks = np.zeros((len(KINDS) + len(COLORS), scene.side, scene.side), np.float32)
    for shape in scene.shapes:
        mask = Image.new("L", (scene.side, scene.side), 0)
        draw = ImageDraw.Draw(mask)
        outline = _outline(shape)
        if shape.kind == "circle":
            draw.ellipse(outline, fill=1)
        elif shape.kind == "square":
            draw.rectangle(outline, fill=1)
        else:
            draw.polygon(outline, fill=1)
        pixels = np.asarray(mask, np.float32)
        masks[KINDS.index(shape.kind)] += pixels
        masks[len(KINDS) + list(COLORS).index(shape.color)] += pixels
    edges = np.linspace(0, scene.side, grid + 1).round().astype(int)
    cells = np.add.reduceat(np.add.reduceat(masks, edges[:-1], axis=1), edges[:-1], axis=2)
    areas = np.outer(np.diff(edges), np.diff(edges))
    return (cells / areas).reshape(masks.shape[0], grid * grid).T


def ask(scene: Scene, template: str, rng: np.random.Generator) -> Question | None:
    """One question of ``template`` about ``scene`` (None: the template has nothing to ask here)."""
    if template == "color":
        shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
        return Question(template, TEMPLATES[template].format(kind=shape.kind), shape.color, shape.box)
    if template == "shape":
        unique = [s for s in scene.shapes if len(scene.with_color(s.color)) == 1]
        if not unique:
            return None
        shape = unique[int(rng.integers(len(unique)))]
        return Question(template, TEMPLATES[template].format(color=shape.color), shape.kind, shape.box)
    if template == "count":
        return Question(template, TEMPLATES[template], COUNT_WORDS[len(scene.shapes) - 1], None)
    if template == "exists":
        present = {(s.color, s.kind) for s in scene.shapes}
        if rng.random() < 0.5:  # yes and no equally often
            color, kind = sorted(present)[int(rng.integers(len(present)))]
        else:
            absent = sorted((c, k) for c in COLORS for k in KINDS if (c, k) not in present)
            color, kind = absent[int(rng.integers(len(absent)))]
        shape = scene.shape(kind)
        yes = shape is not None and shape.color == color
        return Question(
            template,
            TEMPLATES[template].format(color=color, kind=kind),
            "yes" if yes else "no",
            shape.box if yes else None,
        )
    raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")


def questions(scene: Scene, rng: np.random.Generator, per_scene: int, *, distinct: bool = False) -> list[Question]:
    """``per_scene`` questions, templates drawn uniformly (a template with nothing to ask is redrawn);
    ``distinct``: no question twice about one scene (fewer when the scene has fewer to ask)."""
    asked: list[Question] = []
    names = list(TEMPLATES)
    for _ in range(100 * per_scene):
        if len(asked) == per_scene:
            break
        question = ask(scene, names[int(rng.integers(len(names)))], rng)
        if question is not None and not (distinct and any(q.question == question.question for q in asked)):
            asked.append(question)
    return asked


def held_out(images: int, seed: int, per_image: int = 2) -> list[tuple[Scene, Question]]:
    """``images`` scenes from ``seed``, each with ``per_image`` distinct questions: an evaluation set."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(images):
        scene = random_scene(rng)
        items += [(scene, q) for q in questions(scene, rng, per_image, distinct=True)]
    return items


@dataclass(frozen=True)
class Item:
    image: str  #: the picture's file name, relative to the JSON Lines file
    question: str
    answer: str
    template: str
    box: tuple[int, int, int, int] | None

    def to_json(self) -> str:
        record = {"image": self.image, "question": self.question, "answer": self.answer, "template": self.template}
        if self.box is not None:
            record["box"] = list(self.box)
        return json.dumps(record)


def write_dataset(out: str | Path, images: int, seed: int, per_image: int = 2) -> Path:
    """``images`` PNG pictures and ``questions.jsonl`` (``per_image`` questions each) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(images):
        scene = random_scene(rng)
        name = f"shapes_{seed}_{index:05d}.png"
        render(scene).save(out / name)
        lines += [
            Item(name, q.question, q.answer, q.template, q.box).to_json()
            for q in questions(scene, rng, per_image, distinct=True)
        ]
    path = out / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the shapes task: PNG pictures and questions.jsonl.")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--images", type=int, default=100, help="how many pictures (default 100)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (the demo trained on seed 0)")
    parser.add_argument("--per-image", type=int, default=2, help="questions per picture (default 2)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.per_image < 1:
        parser.error("--images and --per-image must be at least 1")
    path = write_dataset(args.out, args.images, args.seed, args.per_image)
    print(f"wrote {args.images} pictures and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
