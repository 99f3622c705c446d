"""What a user hands the runtime, checked at the door: an image file and a prompt."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ccra_export.core.errors import CCRAExportError
from ccra_export.core.image_preprocess import open_rgb

IMAGE_TOKEN = "<image>"


class InputError(CCRAExportError):
    """An image or prompt given to `run` cannot be used."""


def load_image(path: str | Path) -> Image.Image:
    try:
        return open_rgb(path)
    except FileNotFoundError:
        raise InputError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"--image {path}: not a readable image ({exc})") from None


def check_prompt(prompt: str) -> None:
    """A question in words: not empty, and no ``<image>`` (the image goes in through --image)."""
    if not prompt or not prompt.strip():
        raise InputError("--prompt: empty; ask something about the image")
    if IMAGE_TOKEN in prompt:
        raise InputError(f"--prompt: contains {IMAGE_TOKEN}; the image goes in through --image")
