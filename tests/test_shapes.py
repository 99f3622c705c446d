"""The shapes task's generator (``core.shapes``): seeded, to specification, boxes true to the pixels."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ccra_export.core import shapes


def _digest(items) -> str:
    digest = hashlib.sha256()
    for scene, question in items:
        digest.update(shapes.render(scene).tobytes())
        digest.update(json.dumps([question.question, question.answer, question.box]).encode())
    return digest.hexdigest()


def test_generator_is_deterministic_by_seed():
    assert _digest(shapes.held_out(12, 3)) == _digest(shapes.held_out(12, 3))
    assert _digest(shapes.held_out(12, 3)) != _digest(shapes.held_out(12, 4))


def test_scenes_follow_the_specification():
    rng = np.random.default_rng(11)
    counts = set()
    for _ in range(300):
        scene = shapes.random_scene(rng)
        assert shapes.MIN_SIDE <= scene.side <= shapes.MAX_SIDE
        assert all(200 <= c <= 255 for c in scene.background)
        assert 1 <= len(scene.shapes) <= 3 and len({s.kind for s in scene.shapes}) == len(scene.shapes)
        counts.add(len(scene.shapes))
        for shape in scene.shapes:
            left, top, right, bottom = shape.box
            assert 0 <= left < right <= scene.side and 0 <= top < bottom <= scene.side
            assert round(0.18 * scene.side) <= right - left <= 0.35 * scene.side and right - left == bottom - top
            ideal = shapes.COLORS[shape.color]
            assert all(10 <= abs(c - i) <= 40 for c, i in zip(shape.rgb, ideal, strict=True))
        for a in scene.shapes:
            assert not any(shapes._overlaps(a.box, b.box) for b in scene.shapes if b is not a)
    assert counts == {1, 2, 3}


def test_boxes_agree_with_the_pixels():
    """Each shape's pixels span exactly its box; outside every box is background."""
    rng = np.random.default_rng(5)
    for _ in range(40):
        scene = shapes.random_scene(rng)
        pixels = np.asarray(shapes.render(scene)).astype(int)
        outside = np.ones(pixels.shape[:2], bool)
        for shape in scene.shapes:
            left, top, right, bottom = shape.box
            rows, cols = np.nonzero((pixels == shape.rgb).all(axis=-1))
            assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == shape.box, shape
            outside[top:bottom, left:right] = False
        assert (pixels[outside] == scene.background).all()


def test_questions_are_answered_by_the_scene():
    rng = np.random.default_rng(9)
    seen = {t: set() for t in shapes.TEMPLATES}
    for _ in range(200):
        scene = shapes.random_scene(rng)
        for q in shapes.questions(scene, rng, 4):
            seen[q.template].add(q.answer)
            if q.template == "color":
                assert scene.shape(q.question.split()[-1][:-1]).color == q.answer
            elif q.template == "shape":
                color = q.question.split()[-1][:-1]
                assert [s.kind for s in scene.with_color(color)] == [q.answer]  # asked only when unique
            elif q.template == "count":
                assert shapes.COUNT_WORDS.index(q.answer) + 1 == len(scene.shapes)
            else:
                color, kind = q.question[len("Is there a ") : -1].split()
                shape = scene.shape(kind)
                assert q.answer == ("yes" if shape is not None and shape.color == color else "no")
            assert q.box is None or q.box in [s.box for s in scene.shapes]
    assert {t: sorted(v) for t, v in seen.items()} == {t: sorted(a) for t, a in shapes.ANSWERS.items()}


def test_generator_command_writes_pictures_and_questions(tmp_path):
    assert shapes.main(["--out", str(tmp_path), "--images", "3", "--seed", "2"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all((tmp_path / line["image"]).is_file() for line in lines)
    assert {"image", "question", "answer", "template"} <= set(lines[0])
