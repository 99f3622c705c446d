"""User images and the image processor's settings: one loader, one validation, one line each.

- a decompression bomb (Pillow's ``DecompressionBombError`` is not an OSError) is one line in
  ``run`` and a skipped-and-counted file in INT8 calibration, like any unreadable image;
- 16-bit and 32-bit integer images are scaled by their range (Pillow's ``convert`` clips them to
  white), float images taken as 0..1 and refused outside it;
- ``preprocessor_config.json`` is validated where ``build`` reads it, naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ccra_export.calibration.images import load_calibration_set
from ccra_export.cli import main
from ccra_export.core.errors import CheckpointError, ConfigError
from ccra_export.core.image_preprocess import (
    PREPROCESSOR_CONFIG,
    ImageProcessorConfig,
    ImageReadError,
    open_rgb,
    preprocess,
    to_rgb,
)
from ccra_export.runtime.inputs import InputError, load_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path: Path, side: int = 20000) -> Path:
    """A 100-byte PNG whose header claims ``side`` x ``side`` pixels (400 million at 20000)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    row = b"\0" + b"\0" * side
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(row)) + _chunk(b"IEND", b"")
    )
    return path


def gradient16(height: int = 48, width: int = 256) -> np.ndarray:
    """Every 16-bit level across, a different phase per row."""
    ramp = np.linspace(0, 65535, width)
    return np.stack([np.roll(ramp, 3 * r) for r in range(height)]).round().astype(np.uint16)


# ---------------------------------------------------------------- decompression bombs


def test_a_bomb_is_one_line_naming_the_file(tmp_path):
    bomb = write_bomb(tmp_path / "huge.png")
    with pytest.raises(ImageReadError, match=r"huge\.png: too large to decode safely \(Image size \(400000000 pix"):
        open_rgb(bomb)
    with pytest.raises(InputError, match=r"^image .*huge\.png: too large to decode safely"):
        load_image(bomb)


def test_run_refuses_a_bomb_in_one_line(tmp_path):
    bomb = write_bomb(tmp_path / "huge.png")
    result = CliRunner().invoke(main, ["run", "--bundle", str(tmp_path), "--image", str(bomb), "--prompt", "what?"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.strip().startswith(f"error: --image {bomb}: too large to decode safely")
    assert len(result.stderr.strip().splitlines()) == 1


def test_calibration_skips_and_counts_a_bomb(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    write_bomb(tmp_path / "9-huge.png")
    (tmp_path / "8-broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        data = load_calibration_set(tmp_path, holdout=1)
    assert len(data.calibration) + len(data.held_out) == 4
    assert {p.name: reason.split(" (")[0] for p, reason in data.skipped} == {
        "8-broken.jpg": "not a readable image",
        "9-huge.png": "too large to decode safely",
    }
    assert any("9-huge.png: skipped, too large to decode safely" in str(w.message) for w in seen)


# ---------------------------------------------------------------- pixel types


@pytest.mark.parametrize(
    ("suffix", "mode"),
    [(".png", "I;16"), (".tif", "I;16"), (".tif", "I;16B")],
    ids=["png-16", "tiff-16", "tiff-16-big-endian"],
)
def test_a_16_bit_image_maps_to_its_8_bit_version(tmp_path, suffix, mode):
    wide = gradient16()
    eight = np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8)  # the same picture in 8 bits
    image = Image.fromarray(wide.astype(">u2" if mode == "I;16B" else "<u2"))
    assert image.mode == mode
    image.save(tmp_path / f"wide{suffix}")
    Image.fromarray(eight).save(tmp_path / "eight.png")
    with Image.open(tmp_path / f"wide{suffix}") as reopened:
        clipped = np.asarray(reopened.convert("RGB"))
    assert (clipped == 255).mean() > 0.99  # what Pillow's convert alone does: white
    got = np.asarray(open_rgb(tmp_path / f"wide{suffix}")).astype(int)
    want = np.asarray(open_rgb(tmp_path / "eight.png")).astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1
    assert (got == 255).mean() < 0.02  # a gradient, not white
    config = ImageProcessorConfig.for_image_size(56)
    np.testing.assert_allclose(
        preprocess(Image.open(tmp_path / f"wide{suffix}"), config),  # the Python API's path: an opened image
        preprocess(Image.open(tmp_path / "eight.png"), config),
        atol=2.5 / 255 / min(config.image_std),
    )


def test_a_32_bit_integer_image_is_scaled_by_its_declared_range(tmp_path):
    levels = np.arange(256, dtype=np.int64)
    values = (levels * (2**31 - 1) // 255).astype(np.int32)  # signed 32-bit TIFF: 0 .. 2**31 - 1
    image = Image.fromarray(np.tile(values, (8, 1)))
    assert image.mode == "I"
    image.save(tmp_path / "deep.tif")
    got = np.asarray(open_rgb(tmp_path / "deep.tif"))[..., 0].astype(int)
    assert np.abs(got - levels[None, :]).max() <= 1


def test_a_float_image_is_taken_as_0_to_1_and_refused_outside(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "unit.tif")
    got = np.asarray(open_rgb(tmp_path / "unit.tif"))[..., 0].astype(int)
    assert np.abs(got - np.arange(256)[None, :]).max() <= 1
    Image.fromarray(ramp * 4000).save(tmp_path / "radiance.tif")
    with pytest.raises(ImageReadError, match=r"radiance\.tif: a floating-point image with values from 0 to 4000"):
        open_rgb(tmp_path / "radiance.tif")
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        to_rgb(Image.fromarray(np.full((4, 4), np.nan, np.float32)))


def test_the_server_scales_16_bit_images_too(tmp_path):
    from ccra_export.serve.openai.image_urls import ImageLimits, _decode

    Image.fromarray(gradient16()).save(tmp_path / "wide.png")
    got = np.asarray(_decode((tmp_path / "wide.png").read_bytes(), ImageLimits())).astype(int)
    assert np.abs(got[..., 0] - np.rint(gradient16() / 257)).max() <= 1


# ---------------------------------------------------------------- preprocessor_config.json

LLAVA_15 = {  # llava-hf/llava-1.5-7b-hf's preprocessor_config.json, the fields read
    "crop_size": {"height": 336, "width": 336},
    "size": {"shortest_edge": 336},
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 0.00392156862745098,
    "resample": 3,
}


def test_a_real_llava_config_loads(tmp_path):
    (tmp_path / PREPROCESSOR_CONFIG).write_text(json.dumps(LLAVA_15))
    config = ImageProcessorConfig.from_checkpoint(tmp_path, 336, check_crop=True)
    assert (config.shortest_edge, config.crop_height, config.crop_width) == (336, 336, 336)
    assert ImageProcessorConfig.from_dict(dataclasses.asdict(config)) == config  # the manifest's round trip


@pytest.mark.parametrize(
    ("change", "key", "expected"),
    [
        ({"size": {"shortest_edge": 0}}, "size.shortest_edge 0", "a positive whole number"),
        ({"size": {"shortest_edge": -336}}, "size.shortest_edge -336", "a positive whole number"),
        ({"size": {"shortest_edge": 336.5}}, "size.shortest_edge 336.5", "a positive whole number"),
        ({"size": {"shortest_edge": "336"}}, 'size.shortest_edge "336"', "a positive whole number"),
        ({"size": 10**9}, "size.shortest_edge 1000000000", "at most 8192"),
        ({"crop_size": {"height": 0, "width": 336}}, "crop_size.height 0", "a positive whole number"),
        ({"size": {"shortest_edge": 224}}, "crop_size.height 336", "at most the resize's shortest edge 224"),
        (
            {"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}},
            "crop_size.height 224",
            "the vision tower's image_size 336",
        ),
        ({"image_mean": [0.5, 0.5]}, "image_mean [0.5, 0.5]", "three numbers"),
        ({"image_std": [0.2, 0.0, 0.2]}, "image_std [0.2, 0.0, 0.2]", "positive numbers"),
        ({"image_std": [0.2, -1, 0.2]}, "image_std [0.2, -1, 0.2]", "positive numbers"),
        ({"rescale_factor": 0}, "rescale_factor 0", "a positive finite number"),
        ({"resample": 42}, "resample 42", "a Pillow resampling filter"),
    ],
)
def test_a_bad_config_names_the_file_and_key(tmp_path, change, key, expected):
    (tmp_path / PREPROCESSOR_CONFIG).write_text(json.dumps({**LLAVA_15, **change}))
    with pytest.raises(CheckpointError) as raised:
        ImageProcessorConfig.from_checkpoint(tmp_path, 336, check_crop=True)  # as build reads it
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / PREPROCESSOR_CONFIG}: {key}: expected"), message
    assert expected in message and "\n" not in message


def test_a_config_that_is_not_json_or_not_an_object(tmp_path):
    (tmp_path / PREPROCESSOR_CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid image processor config"):
        ImageProcessorConfig.from_checkpoint(tmp_path, 336)
    (tmp_path / PREPROCESSOR_CONFIG).write_text("[336]")
    with pytest.raises(CheckpointError, match="expected a JSON object, got list"):
        ImageProcessorConfig.from_checkpoint(tmp_path, 336)


def test_a_bad_config_from_a_manifest_is_one_line_too():
    with pytest.raises(ConfigError, match=r"^image processor crop_width 400: expected at most the resize's"):
        ImageProcessorConfig(shortest_edge=336, crop_height=336, crop_width=400)
    with pytest.raises(ConfigError, match="image processor image_std"):
        ImageProcessorConfig.from_dict(
            {**dataclasses.asdict(ImageProcessorConfig.for_image_size(56)), "image_std": [1, 1]}
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"crop_size": {"height": 56, "width": 56}, "size": {"shortest_edge": 28}},
            "crop_size.height 56: expected at most the resize's shortest edge 28",
        ),
        (
            {"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}},
            "crop_size.height 224: expected the vision tower's image_size 56 (config.json)",
        ),
        ({"size": {"shortest_edge": 0}}, "size.shortest_edge 0: expected a positive whole number"),
    ],
    ids=["crop-over-resize", "crop-not-the-model-input", "zero-size"],
)
def test_build_refuses_a_bad_config_before_exporting(checkpoint_copy, tmp_path, change, message):
    (checkpoint_copy / PREPROCESSOR_CONFIG).write_text(json.dumps({**LLAVA_15, **change}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", "--model", str(checkpoint_copy), "--precision", "fp32", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert f"error: {checkpoint_copy / PREPROCESSOR_CONFIG}: {message}" in result.stderr
    assert "Exporting" not in result.stderr  # found before the slow work
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]
