"""Image preprocessing identical to Hugging Face's ``CLIPImageProcessor`` (PIL backend).

Shared by calibration (INT8) and the runtime (generation), so it lives in core; numpy + Pillow only.

Same operations in the same order and dtypes (uint8 PIL bicubic resize of the shortest edge,
centre crop, float64 rescale cast to float32, float32 normalise), so the tests can require
bit-equality with transformers' processor. LLaVA-1.5's ``image_aspect_ratio == "pad"`` first
pads the image to a square filled with the mean colour (``expand2square``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ccra_export.core.errors import CheckpointError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageProcessorConfig:
    shortest_edge: int
    crop_height: int
    crop_width: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    pad_to_square: bool = True  # LLaVA-1.5's image_aspect_ratio "pad"

    @classmethod
    def from_dict(cls, record: dict) -> ImageProcessorConfig:
        """Inverse of ``dataclasses.asdict`` (JSON turns the mean/std tuples into lists)."""
        return cls(**{**record, "image_mean": tuple(record["image_mean"]), "image_std": tuple(record["image_std"])})

    @classmethod
    def for_image_size(cls, image_size: int, *, pad_to_square: bool = True) -> ImageProcessorConfig:
        return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size, pad_to_square=pad_to_square)

    @classmethod
    def from_checkpoint(cls, directory: Path, image_size: int, *, pad_to_square: bool = True) -> ImageProcessorConfig:
        """``preprocessor_config.json`` when the checkpoint has one, else CLIP defaults at ``image_size``."""
        path = Path(directory) / PREPROCESSOR_CONFIG
        if not path.is_file():
            return cls.for_image_size(image_size, pad_to_square=pad_to_square)
        try:
            raw = json.loads(path.read_text())
            size, crop = raw.get("size", {}), raw.get("crop_size", {})
            shortest = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
            crop_h = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
            crop_w = crop.get("width", image_size) if isinstance(crop, dict) else int(crop)
            return cls(
                shortest_edge=int(shortest),
                crop_height=int(crop_h),
                crop_width=int(crop_w),
                image_mean=tuple(raw.get("image_mean", CLIP_MEAN)),
                image_std=tuple(raw.get("image_std", CLIP_STD)),
                rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
                resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
                pad_to_square=pad_to_square,
            )
        except (ValueError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a valid image processor config ({exc})") from None


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully (a truncated file fails here, not later) as RGB."""
    with Image.open(path) as handle:
        handle.load()
        return handle.convert("RGB")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: pad the short side symmetrically with ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return canvas


def preprocess(image: Image.Image, config: ImageProcessorConfig) -> np.ndarray:
    """One PIL image -> float32 [3, crop_height, crop_width], as CLIPImageProcessor computes it."""
    image = image.convert("RGB")
    if config.pad_to_square:
        image = expand_to_square(image, tuple(int(x * 255) for x in config.image_mean))
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize((new_width, new_height), resample=config.resample, reducing_gap=None)
    pixels = np.asarray(image)  # HWC uint8
    top = (new_height - config.crop_height) // 2
    left = (new_width - config.crop_width) // 2
    if top < 0 or left < 0:
        raise ValueError(
            f"resize to shortest edge {config.shortest_edge} is smaller than the crop "
            f"{config.crop_height}x{config.crop_width}"
        )
    pixels = pixels[top : top + config.crop_height, left : left + config.crop_width]
    scaled = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))


@dataclass(frozen=True)
class CropGeometry:
    """Where the processor's crop came from in the original image: crop pixel (x, y) covers
    original pixels from ``(x * scale_x - offset_x, y * scale_y - offset_y)`` on, so anything
    computed on the crop (an attention map over its patches) can be drawn on the photo.
    ``offset`` undoes LLaVA's pad-to-square and the centre crop; ``scale`` the resize."""

    image_width: int
    image_height: int
    crop_width: int
    crop_height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def to_image(self, x: float, y: float) -> tuple[float, float]:
        """A point of the crop (crop pixels) in original-image pixels (may fall in the padding)."""
        return x * self.scale_x - self.offset_x, y * self.scale_y - self.offset_y

    def box(self, left: float, top: float, right: float, bottom: float) -> tuple[float, float, float, float]:
        """A rectangle of the crop in original-image pixels, clipped to the image."""
        x0, y0 = self.to_image(left, top)
        x1, y1 = self.to_image(right, bottom)
        clip_x = lambda v: min(max(v, 0.0), float(self.image_width))  # noqa: E731
        clip_y = lambda v: min(max(v, 0.0), float(self.image_height))  # noqa: E731
        return clip_x(x0), clip_y(y0), clip_x(x1), clip_y(y1)


def crop_geometry(image_size: tuple[int, int], config: ImageProcessorConfig) -> CropGeometry:
    """``preprocess``'s pad, resize and crop, inverted for an image of ``(width, height)``."""
    width, height = image_size
    pad_x = pad_y = 0
    padded_w, padded_h = width, height
    if config.pad_to_square and width != height:
        side = max(width, height)
        pad_x, pad_y = (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)
        padded_w = padded_h = side
    short, long = (padded_w, padded_h) if padded_w <= padded_h else (padded_h, padded_w)
    new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
    new_w, new_h = (new_short, new_long) if padded_w <= padded_h else (new_long, new_short)
    top = (new_h - config.crop_height) // 2
    left = (new_w - config.crop_width) // 2
    scale_x, scale_y = padded_w / new_w, padded_h / new_h
    return CropGeometry(
        image_width=width,
        image_height=height,
        crop_width=config.crop_width,
        crop_height=config.crop_height,
        scale_x=scale_x,
        scale_y=scale_y,
        offset_x=pad_x - left * scale_x,
        offset_y=pad_y - top * scale_y,
    )
