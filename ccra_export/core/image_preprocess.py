"""Image preprocessing identical to Hugging Face's ``CLIPImageProcessor`` (PIL backend).

Shared by calibration (INT8) and the runtime (generation), so it lives in core; numpy + Pillow only.

Same operations in the same order and dtypes (uint8 PIL bicubic resize of the shortest edge,
centre crop, float64 rescale cast to float32, float32 normalise), so the tests can require
bit-equality with transformers' processor. LLaVA-1.5's ``image_aspect_ratio == "pad"`` first
pads the image to a square filled with the mean colour (``expand2square``).
"""

from __future__ import annotations

import contextlib
import json
import math
import stat
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ccra_export.core.errors import CCRAExportError, CheckpointError, ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
#: the largest resize / crop edge accepted (a resize to it is ~200 MB of RGB)
MAX_EDGE = 8192
_RESAMPLING = frozenset(int(r) for r in Image.Resampling)
# ImageProcessorConfig field -> its key in preprocessor_config.json (for messages)
_JSON_KEYS = {
    "shortest_edge": "size.shortest_edge",
    "crop_height": "crop_size.height",
    "crop_width": "crop_size.width",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _invalid(values: dict[str, Any]) -> tuple[str, Any, str] | None:
    """The first field that would make every ``preprocess`` fail or compute garbage, as
    (field, value, what was expected); None when the configuration is usable."""
    for name in ("shortest_edge", "crop_height", "crop_width"):
        value = values[name]
        if not _is_int(value) or not 1 <= value <= MAX_EDGE:
            return name, value, f"a positive whole number of pixels, at most {MAX_EDGE}"
    for name in ("crop_height", "crop_width"):
        if values[name] > values["shortest_edge"]:
            return name, values[name], f"at most the resize's shortest edge {values['shortest_edge']}"
    for name in ("image_mean", "image_std"):
        value = values[name]
        if not isinstance(value, list | tuple) or len(value) != 3 or not all(_is_number(v) for v in value):
            return name, value, "three numbers, one per RGB channel"
        if not all(math.isfinite(v) for v in value):
            return name, value, "finite numbers"
    if not all(v > 0 for v in values["image_std"]):
        return "image_std", values["image_std"], "positive numbers (it divides)"
    factor = values["rescale_factor"]
    if not _is_number(factor) or not math.isfinite(factor) or factor <= 0:
        return "rescale_factor", factor, "a positive finite number (1/255 for 8-bit images)"
    if not _is_int(values["resample"]) or int(values["resample"]) not in _RESAMPLING:
        return "resample", values["resample"], f"a Pillow resampling filter, one of {sorted(_RESAMPLING)}"
    if not isinstance(values["pad_to_square"], bool):
        return "pad_to_square", values["pad_to_square"], "true or false"
    return None


@dataclass(frozen=True)
class ImageProcessorConfig:
    """CLIPImageProcessor's settings; validated on construction (from a checkpoint, a manifest or
    code alike), so a zero size or a crop larger than the resize fails here, in one line, not in
    every later ``preprocess``."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    pad_to_square: bool = True  # LLaVA-1.5's image_aspect_ratio "pad"

    def __post_init__(self) -> None:
        problem = _invalid({f.name: getattr(self, f.name) for f in fields(self)})
        if problem is not None:
            name, value, expected = problem
            raise ConfigError(f"image processor {name} {value!r}: expected {expected}")

    @classmethod
    def from_dict(cls, record: dict) -> ImageProcessorConfig:
        """Inverse of ``dataclasses.asdict`` (JSON turns the mean/std tuples into lists)."""
        return cls(**{**record, "image_mean": tuple(record["image_mean"]), "image_std": tuple(record["image_std"])})

    @classmethod
    def for_image_size(cls, image_size: int, *, pad_to_square: bool = True) -> ImageProcessorConfig:
        return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size, pad_to_square=pad_to_square)

    @classmethod
    def from_checkpoint(
        cls, directory: Path, image_size: int, *, pad_to_square: bool = True, check_crop: bool = False
    ) -> ImageProcessorConfig:
        """``preprocessor_config.json`` when the checkpoint has one, else CLIP defaults at ``image_size``.

        Checked here, where ``build`` reads it: every value in range (one line naming the file and
        the key) and, with ``check_crop``, a crop of the vision tower's ``image_size``: the only
        input its position embeddings take, so any other crop would make every ``run`` fail."""
        path = Path(directory) / PREPROCESSOR_CONFIG
        if not path.is_file():
            return cls.for_image_size(image_size, pad_to_square=pad_to_square)
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a valid image processor config ({exc})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        size, crop = raw.get("size", {}), raw.get("crop_size", {})
        values = {
            "shortest_edge": size.get("shortest_edge", image_size) if isinstance(size, dict) else size,
            "crop_height": crop.get("height", image_size) if isinstance(crop, dict) else crop,
            "crop_width": crop.get("width", image_size) if isinstance(crop, dict) else crop,
            "image_mean": raw.get("image_mean", CLIP_MEAN),
            "image_std": raw.get("image_std", CLIP_STD),
            "rescale_factor": raw.get("rescale_factor", 1 / 255),
            "resample": raw.get("resample", int(Image.Resampling.BICUBIC)),
            "pad_to_square": pad_to_square,
        }
        problem = _invalid(values)
        if problem is None and check_crop:
            problem = next(
                (
                    (name, values[name], f"the vision tower's image_size {image_size} (config.json)")
                    for name in ("crop_height", "crop_width")
                    if values[name] != image_size
                ),
                None,
            )
        if problem is not None:
            name, value, expected = problem
            key = _JSON_KEYS.get(name, name)
            raise CheckpointError(f"{path}: {key} {json.dumps(value)}: expected {expected}")
        return cls(**{**values, "image_mean": tuple(values["image_mean"]), "image_std": tuple(values["image_std"])})


class ImageReadError(CCRAExportError):
    """An image file (or picture) that cannot be used: missing, not an image, truncated, over
    Pillow's decompression-bomb limit, or of a pixel type with no meaningful 8-bit scale."""

    def __init__(self, source: str | Path, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


class ImageTooLargeError(ImageReadError):
    """More pixels than preprocessing may hold at once: the picture itself, or the square that
    LLaVA's pad-to-square makes of it (``working_pixels``), over the limit."""

    def __init__(self, source: str | Path, size: tuple[int, int], pixels: int, limit: int) -> None:
        width, height = size
        padded = max(width, height)
        square = f", a {padded}x{padded} square once padded ({pixels} pixels)" if pixels > width * height else ""
        super().__init__(source, f"{width}x{height} pixels{square}; the limit is {limit}")
        self.width, self.height, self.pixels, self.limit = width, height, pixels, limit


#: the formats people send photos in: Pillow is asked to open these only (EPS, for one, would run
#: Ghostscript where it is installed; PSD, ICNS, FITS... are no one's camera output)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
#: Pillow's own decompression-bomb bound (``Image.MAX_IMAGE_PIXELS``) when it has none set
_PILLOW_DEFAULT_PIXELS = 89_478_485
#: pixels converted at once from 16/32-bit or float to 8 bits (float64 strips of 64 MB at most)
_STRIP_PIXELS = 8 << 20

# errors Pillow raises on a malformed file, beyond OSError (truncated data, bad headers)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError)


def pixel_limit() -> int:
    """The pixels preprocessing may hold at once where the caller sets no limit (`run`, `explain`):
    Pillow's decompression-bomb bound, above which it warns (and at twice which it refuses)."""
    return int(Image.MAX_IMAGE_PIXELS or _PILLOW_DEFAULT_PIXELS)


def working_pixels(size: tuple[int, int], config: ImageProcessorConfig | None) -> int:
    """The largest picture ``preprocess`` holds for an image of ``size``: the image itself, the
    square LLaVA pads it to, and the resize of that to the processor's shortest edge (a 30000x1
    image padded is a 900-megapixel canvas; unpadded, its resize is 336 x 10 million). This is
    what a pixel limit must bound, and it is known from the file's header, before decoding."""
    width, height = size
    pixels = width * height
    if config is None or width <= 0 or height <= 0:
        return pixels
    if config.pad_to_square:
        width = height = max(width, height)
    short, long = min(width, height), max(width, height)
    resized = config.shortest_edge * int(config.shortest_edge * long / short)
    return max(pixels, width * height, resized)


def check_pixels(
    size: tuple[int, int], config: ImageProcessorConfig | None, limit: int, source: str | Path = "image"
) -> None:
    """Refuse (``ImageTooLargeError``) an image whose preprocessing would hold over ``limit`` pixels."""
    pixels = working_pixels(size, config)
    if pixels > limit:
        raise ImageTooLargeError(source, size, pixels, limit)


@contextlib.contextmanager
def _bombs_refused() -> Iterator[None]:
    """Pillow's DecompressionBombWarning (over its bound, under twice it) as an exception to
    refuse in one line, not a warning printed raw on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def open_rgb(
    path: str | Path, config: ImageProcessorConfig | None = None, max_pixels: int | None = None
) -> Image.Image:
    """The one loader for user images: decode fully (a truncated file fails here, not later) and
    convert to 8-bit RGB (``to_rgb``). Only regular files (a FIFO would block forever) in the
    formats of ``IMAGE_FORMATS``; with ``config``, an image whose preprocessing would hold over
    ``max_pixels`` (default ``pixel_limit()``) is refused from its header, before decoding. Every
    failure is one ``ImageReadError`` naming the file, Pillow's ``DecompressionBombError`` (not
    an OSError) and its warning included."""
    try:
        mode = Path(path).stat().st_mode
        if stat.S_ISDIR(mode):
            raise ImageReadError(path, "a directory, not an image file")
        if not stat.S_ISREG(mode):
            raise ImageReadError(path, "not a regular file (a pipe, socket or device is not read)")
        with _bombs_refused(), Image.open(path, formats=IMAGE_FORMATS) as handle:
            check_pixels(handle.size, config, max_pixels or pixel_limit(), path)
            handle.load()
            return to_rgb(handle, path)
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(path, "a directory, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(path, f"too large to decode safely ({_first_line(exc)})") from None
    except ImageReadError:
        raise
    except UnidentifiedImageError as exc:
        formats = ", ".join(IMAGE_FORMATS)
        raise ImageReadError(path, f"not a readable image ({formats}): {_first_line(exc)}") from None
    except DECODE_ERRORS as exc:
        raise ImageReadError(path, f"not a readable image ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _integer_range(image: Image.Image) -> int:
    """The largest value an integer-mode image's samples can hold: the file's declared depth
    (PNG: 16 bits; TIFF: BitsPerSample and SampleFormat), else 16 bits when the values fit."""
    if image.mode.startswith("I;16") or image.format == "PNG":  # PNG has no 32-bit samples
        return 0xFFFF
    tags = getattr(image, "tag_v2", {})
    bits, sample_format = tags.get(258), tags.get(339)  # BitsPerSample, SampleFormat (2: signed)
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    sample_format = sample_format[0] if isinstance(sample_format, tuple) and sample_format else sample_format
    if isinstance(bits, int) and 8 <= bits <= 32:
        return (1 << (bits - 1 if sample_format == 2 else bits)) - 1
    low, high = image.getextrema()
    return 0xFFFF if 0 <= low and high <= 0xFFFF else 0xFFFFFFFF


def to_rgb(image: Image.Image, source: str | Path = "image") -> Image.Image:
    """8-bit RGB with the pixel values meant: 16-bit (``I;16*``) and 32-bit integer (``I``)
    images are scaled by their range (65535 -> 255, i.e. /257; negative values are black), where
    Pillow's ``convert`` clips them to white; floating-point (``F``) images are taken as 0..1 and
    refused outside it. Other modes go through ``convert("RGB")``."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        scale = 255.0 / _integer_range(image)
    elif image.mode == "F":
        samples = np.asarray(image)
        finite = bool(np.isfinite(samples).all())
        low, high = (float(samples.min(initial=0.0)), float(samples.max(initial=0.0))) if finite else (0.0, 0.0)
        if not finite or low < -1e-6 or high > 1 + 1e-6:
            values = f"values from {low:g} to {high:g}" if finite else "NaN or infinite values"
            raise ImageReadError(source, f"a floating-point image with {values}; expected 0..1")
        scale = 255.0
    else:
        try:
            return image.convert("RGB")
        except ValueError as exc:
            raise ImageReadError(source, f"pixel mode {image.mode} cannot be shown as RGB ({exc})") from None
    samples = np.asarray(image)
    eight = np.empty(samples.shape, np.uint8)
    rows = max(1, _STRIP_PIXELS // max(1, image.width))  # float64 strips: bounded, whatever the image's size
    for top in range(0, samples.shape[0], rows):
        strip = samples[top : top + rows].astype(np.float64) * scale
        eight[top : top + rows] = np.clip(np.rint(strip), 0, 255)
    return Image.fromarray(eight, "L").convert("RGB")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: pad the short side symmetrically with ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return canvas


def preprocess(image: Image.Image, config: ImageProcessorConfig, max_pixels: int | None = None) -> np.ndarray:
    """One PIL image -> float32 [3, crop_height, crop_width], as CLIPImageProcessor computes it.

    Refused (``ImageTooLargeError``) before any pixel is touched when the picture, its padded
    square or its resize would hold over ``max_pixels`` (default ``pixel_limit()``)."""
    check_pixels(image.size, config, max_pixels or pixel_limit())
    image = to_rgb(image)
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
