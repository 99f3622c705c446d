"""The one bounded image decoder the OpenAI server and the Triton models share.

The pixel count is checked from the header, before any pixel is decoded; 16- and 32-bit images
are scaled to 8 bits, not clipped. Refusals are domain errors naming the ``image``: each front end
words them for its clients (the server as ``image_url`` with 400 or 413, Triton as the tensor).
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from ccra_export.core.image_preprocess import ImageReadError, to_rgb
from ccra_export.runtime.inputs import InputError


class ImageTooLargeError(InputError):
    """More pixels than the deployment decodes (a decompression bomb, or just too big)."""

    def __init__(self, width: int, height: int, limit: int) -> None:
        super().__init__(f"{width}x{height} pixels; the limit is {limit}", field="image")
        self.width, self.height, self.limit = width, height, limit


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB, at most ``max_pixels`` pixels."""
    try:
        with Image.open(io.BytesIO(data)) as handle:
            width, height = handle.size
            if width * height > max_pixels:
                raise ImageTooLargeError(width, height, max_pixels)
            handle.load()
            return to_rgb(handle)
    except InputError:
        raise
    except ImageReadError as exc:
        raise InputError(exc.problem, field="image") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"not a readable image ({type(exc).__name__})", field="image") from None
