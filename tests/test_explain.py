"""CCRA's attention drawn: patches land on the right pixels of a non-square photo (with and without
LLaVA's pad-to-square), the pictures keep the photo's shape, and the files agree with the map."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ccra_export.cli import main
from ccra_export.core.image_preprocess import CLIP_MEAN, CLIP_STD, ImageProcessorConfig, crop_geometry, preprocess
from ccra_export.runtime.attention import AttentionMap
from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.workflows.explain import heat_image, overlay
from tests.conftest import TINY_FP32
from tests.test_generation import PROMPT

SIZE, PATCH = 56, 14  # the tiny preset: a 4x4 grid
GRID = SIZE // PATCH
WIDTH, HEIGHT = 300, 180
MARK = (200, 100, 228, 128)  # a red square in the photo: left, top, right, bottom


def marked_photo() -> Image.Image:
    pixels = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    left, top, right, bottom = MARK
    pixels[top:bottom, left:right] = (255, 0, 0)
    return Image.fromarray(pixels)


def patch_seeing_the_mark(config: ImageProcessorConfig) -> tuple[int, int]:
    """Independent of the geometry code: run the real preprocessing and find the reddest patch."""
    crop = preprocess(marked_photo(), config).transpose(1, 2, 0) * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    redness = (crop[..., 0] - crop[..., 1]).clip(0)
    per_patch = redness.reshape(GRID, PATCH, GRID, PATCH).sum(axis=(1, 3))
    row, col = np.unravel_index(int(per_patch.argmax()), per_patch.shape)
    return int(row), int(col)


def one_hot_map(config: ImageProcessorConfig, row: int, col: int, layers: int = 3) -> AttentionMap:
    weights = np.zeros((layers, GRID * GRID))
    weights[:, row * GRID + col] = 1 / layers
    return AttentionMap.from_output(weights, tuple(range(1, layers + 1)), crop_geometry((WIDTH, HEIGHT), config))


@pytest.mark.parametrize("pad_to_square", [True, False])
def test_a_hot_patch_lands_on_what_it_saw(pad_to_square):
    config = ImageProcessorConfig.for_image_size(SIZE, pad_to_square=pad_to_square)
    row, col = patch_seeing_the_mark(config)
    amap = one_hot_map(config, row, col)
    left, top, right, bottom = amap.patch_box(row, col)
    centre_x, centre_y = (MARK[0] + MARK[2]) / 2, (MARK[1] + MARK[3]) / 2
    assert left <= centre_x <= right and top <= centre_y <= bottom, (amap.patch_box(row, col), MARK)
    heat = heat_image(amap, (WIDTH, HEIGHT))  # the overlay's heat, at the photo's own pixels
    hot_y, hot_x = np.unravel_index(int(heat.argmax()), heat.shape)
    assert left <= hot_x < right and top <= hot_y < bottom


@pytest.mark.parametrize(
    ("pad_to_square", "row", "col", "expected"),
    [
        # padded to 300x300 (60 rows above), resized to 56: a patch is 75 photo pixels
        (True, 1, 2, (150.0, 15.0, 225.0, 90.0)),
        (True, 0, 0, (0.0, 0.0, 75.0, 15.0)),  # mostly padding: clipped to the photo
        # resized to 93x56 (shortest edge 56), centre crop from x = 18: a patch is 14*300/93 x 45 pixels
        (False, 2, 1, ((14 + 18) * 300 / 93, 90.0, (28 + 18) * 300 / 93, 135.0)),
    ],
)
def test_patch_boxes_by_hand(pad_to_square, row, col, expected):
    config = ImageProcessorConfig.for_image_size(SIZE, pad_to_square=pad_to_square)
    assert one_hot_map(config, row, col).patch_box(row, col) == pytest.approx(expected, abs=1e-6)


def test_summary_agrees_with_the_map():
    rng = np.random.default_rng(0)
    raw = rng.random((3, GRID * GRID))
    amap = AttentionMap.from_output(
        raw / raw.sum(), (4, 8, 12), crop_geometry((WIDTH, HEIGHT), ImageProcessorConfig.for_image_size(SIZE))
    )
    summary = amap.summary(k=3)
    assert sum(summary["layer_shares"]) == pytest.approx(1.0)
    assert summary["layer_shares"] == pytest.approx(list((raw / raw.sum()).sum(axis=1)))
    flat = (raw / raw.sum()).sum(axis=0)
    assert [(p["row"] * GRID + p["col"]) for p in summary["top_patches"]] == list(np.argsort(-flat)[:3])
    assert 0 < summary["entropy_normalised"] <= 1
    one_hot = one_hot_map(ImageProcessorConfig.for_image_size(SIZE), 1, 1, layers=1)
    assert one_hot.entropy() == 0.0


def test_overlay_keeps_the_photos_shape():
    config = ImageProcessorConfig.for_image_size(SIZE)
    picture = overlay(marked_photo(), one_hot_map(config, 1, 2))
    assert picture.size == (WIDTH, HEIGHT)
    big = Image.new("RGB", (4000, 1000), (90, 90, 90))
    amap = AttentionMap.from_output(np.full((1, 16), 1 / 16), (1,), crop_geometry(big.size, config))
    assert overlay(big, amap).size == (1600, 400)  # scaled down, same aspect ratio


def test_explain_writes_pictures_and_a_map_that_agree(ccra_bundle, cat, tmp_path):
    cat.save(tmp_path / "cat.png")
    out = tmp_path / "explained"
    result = CliRunner().invoke(
        main,
        [
            "explain",
            "--bundle",
            str(ccra_bundle),
            "--image",
            str(tmp_path / "cat.png"),
            "--prompt",
            PROMPT,
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    weights = np.load(out / "attention.npy")
    summary = json.loads((out / "attention.json").read_text())
    assert weights.shape == (3, GRID, GRID) and weights.sum() == pytest.approx(1.0, abs=1e-5)
    assert summary["layer_shares"] == pytest.approx(list(weights.sum(axis=(1, 2))), abs=1e-6)
    assert summary["grid"] == [GRID, GRID] and summary["image_size"] == list(cat.size)
    top = summary["top_patches"][0]
    assert weights.sum(axis=0)[top["row"], top["col"]] == pytest.approx(weights.sum(axis=0).max(), abs=1e-7)
    overlay_png = Image.open(out / "overlay.png")
    assert overlay_png.size == cat.size  # the photo's own pixels and aspect ratio
    for name in ("layers.png", "layer_shares.png"):
        assert Image.open(out / name).format == "PNG"
    # the map is the vision graph's output for this question, as the Python API returns it
    pipeline = Pipeline.from_bundle(ccra_bundle)
    np.testing.assert_allclose(pipeline.attention(tmp_path / "cat.png", PROMPT).weights, weights, atol=1e-6)
    again = CliRunner().invoke(
        main,
        [
            "explain",
            "--bundle",
            str(ccra_bundle),
            "--image",
            str(tmp_path / "cat.png"),
            "--prompt",
            PROMPT,
            "--out",
            str(out),
        ],
    )
    assert again.exit_code == 2 and "pass --force" in again.stderr


class OlderFp16Map:
    """The vision graph of an FP16 bundle built before the map was FP32: it gives the map in float16."""

    def __init__(self, vision) -> None:
        self.vision = vision

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.vision.run(feeds)
        return {**outputs, "lpwca_attention": outputs["lpwca_attention"].astype(np.float16)}


def test_an_older_bundles_fp16_map_is_read_like_an_fp32_one(ccra_bundle, cat):
    pipeline = Pipeline.from_bundle(ccra_bundle)
    want = pipeline.attention(cat, PROMPT).weights
    pipeline.vision = OlderFp16Map(pipeline.vision)
    older = pipeline.attention(cat, PROMPT)
    assert older.weights.dtype == np.float64 and older.weights.sum() == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(older.weights, want, rtol=1e-3)  # FP16's rounding, nothing else
    prepared = pipeline.prepare(cat, PROMPT)
    assert prepared.attention.dtype == np.float32
    np.testing.assert_array_equal(prepared.attention[0], older.weights.reshape(3, -1).astype(np.float32))


def test_run_writes_the_attention_overlay(ccra_bundle, cat, tmp_path):
    cat.save(tmp_path / "cat.png")
    args = ["run", "--bundle", str(ccra_bundle), "--image", str(tmp_path / "cat.png"), "--prompt", PROMPT]
    result = CliRunner().invoke(main, [*args, "--max-new-tokens", "2", "--attention-map", str(tmp_path / "map.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "map.png").size == cat.size


def test_plain_variant_has_no_map(fp32_bundle, cat, tmp_path):
    cat.save(tmp_path / "cat.png")
    out = tmp_path / "explained"
    args = ["--bundle", str(fp32_bundle), "--image", str(tmp_path / "cat.png"), "--prompt", PROMPT]
    result = CliRunner().invoke(main, ["explain", *args, "--out", str(out)])
    assert result.exit_code == 2 and "outputs no attention map (the plain LLaVA-1.5 variant" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    run = CliRunner().invoke(main, ["run", *args, "--attention-map", str(tmp_path / "m.png")])
    assert run.exit_code == 2 and "outputs no attention map" in run.stderr and not (tmp_path / "m.png").exists()


def test_run_refuses_an_attention_map_that_is_not_png_before_loading(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--bundle",
            str(tmp_path / "nothing"),
            "--image",
            "x.png",
            "--prompt",
            PROMPT,
            "--attention-map",
            "m.jpg",
        ],
    )
    assert result.exit_code == 2 and "--attention-map m.jpg: expected a .png file name" in result.stderr


def test_share_in_box_counts_the_box_area_of_each_patch():
    """All attention on one patch of a 4x4 grid over a 400x400 photo (100 px patches): a box over
    that patch holds all of it, a box over its left half holds half, a box elsewhere none."""
    from ccra_export.core.image_preprocess import ImageProcessorConfig, crop_geometry
    from ccra_export.runtime.attention import AttentionMap

    weights = np.zeros((2, 16))
    weights[0, 5] = weights[1, 5] = 0.5  # row 1, col 1: pixels 100..200 both ways
    geometry = crop_geometry((400, 400), ImageProcessorConfig.for_image_size(56))
    amap = AttentionMap.from_output(weights, (1, 2), geometry)
    assert amap.share_in_box((100, 100, 200, 200)) == pytest.approx(1.0)
    assert amap.share_in_box((100, 100, 150, 200)) == pytest.approx(0.5)
    assert amap.share_in_box((300, 300, 400, 400)) == 0.0
    assert amap.box_share((100, 100, 200, 200)) == pytest.approx(1 / 16)


def test_explain_names_what_a_vision_only_bundle_lacks(bundles, cat, tmp_path):
    """The map is the vision graph's, but it is conditioned on the question's token embeddings: a
    bundle built without a language model has no tokenizer or embeddings, and says so (a plain one
    has no map at all, and says that first)."""
    cat.save(tmp_path / "cat.png")
    for args, expected in (
        (TINY_FP32, "holds no tokenizer or token embeddings"),
        (("--model", "tiny", "--random-weights", "--precision", "fp32", "--plain"), "outputs no attention map"),
    ):
        bundle, out = bundles(*args), tmp_path / "explained"
        result = CliRunner().invoke(
            main,
            [
                "explain",
                "--bundle",
                str(bundle),
                "--image",
                str(tmp_path / "cat.png"),
                "--prompt",
                PROMPT,
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 2 and expected in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
