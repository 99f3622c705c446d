"""Calibration images and prompts from a folder: discovery, decoding with skip-and-count, held-out split."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ccra_export.core.errors import CCRAExportError
from ccra_export.core.image_preprocess import ImageReadError, open_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_PROMPTS = (
    "Describe the image in detail.",
    "What is in this picture?",
    "What objects can you see and where are they?",
    "Describe the colours and the background of the image.",
    "What is the main subject doing?",
    "Is there any text in the image? What does it say?",
    "Describe the scene to someone who cannot see it.",
    "What stands out most in this image?",
)


class CalibrationDataError(CCRAExportError):
    """The calibration folder or prompts file cannot be used as given."""


@dataclass
class CalibrationImage:
    path: Path
    image: Image.Image
    prompt: str


@dataclass
class CalibrationSet:
    calibration: list[CalibrationImage]
    held_out: list[CalibrationImage]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def discover(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationDataError("no such directory", field="calib_data", value=folder)
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise CalibrationDataError(f"no {'/'.join(IMAGE_SUFFIXES)} images in it", field="calib_data", value=folder)
    return paths


def load_prompts(path: Path | None, count: int) -> list[str]:
    """One instruction per image (a line each, in image order), or the default set, cycled."""
    if path is None:
        return [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(count)]
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"unreadable ({exc})", field="prompts", value=path) from None
    if len(lines) != count:
        raise CalibrationDataError(
            f"{len(lines)} instructions for {count} images; expected one line per image, in file-name order",
            field="prompts",
            value=path,
        )
    return lines


def load_calibration_set(
    folder: Path, *, prompts: Path | None = None, holdout: int | None = None, limit: int | None = None
) -> CalibrationSet:
    """Decode every image (unreadable ones, decompression bombs and unusable pixel types are
    skipped with a warning and counted) and split off ``holdout`` images (default: 10%, at least
    1) for INT8 parity: they are never calibrated on."""
    paths = discover(folder)
    if limit is not None:
        paths = paths[:limit]
    instructions = load_prompts(prompts, len(paths))
    loaded, skipped = [], []
    for path, prompt in zip(paths, instructions, strict=True):
        try:
            loaded.append(CalibrationImage(path, open_rgb(path), prompt))
        except ImageReadError as exc:
            warnings.warn(f"{path}: skipped, {exc.problem}", stacklevel=2)
            skipped.append((path, exc.problem))
    if not loaded:
        first = f" (first: {skipped[0][0].name}: {skipped[0][1]})" if skipped else ""
        raise CalibrationDataError(
            f"none of the {len(paths)} images could be read{first}", field="calib_data", value=folder
        )
    if len(loaded) < 2:
        raise CalibrationDataError(
            f"{len(loaded)} readable image; INT8 needs at least 2 (calibration + held-out parity)",
            field="calib_data",
            value=folder,
        )
    return split_held_out(loaded, holdout, "readable images", skipped)


def split_held_out(
    items: list[CalibrationImage],
    holdout: int | None,
    what: str,
    skipped: list[tuple[Path, str]] | None = None,
) -> CalibrationSet:
    """The last ``holdout`` items (default: 10%, at least 1) kept out of calibration for parity."""
    holdout = max(1, len(items) // 10) if holdout is None else holdout
    if not 1 <= holdout < len(items):
        raise CalibrationDataError(
            f"expected 1..{len(items) - 1} for {len(items)} {what}", field="holdout", value=holdout
        )
    return CalibrationSet(items[:-holdout], items[-holdout:], skipped or [])
