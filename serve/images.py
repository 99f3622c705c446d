"""The one bounded image decoder the OpenAI server and the Triton models share.

What is bounded is what preprocessing will hold, known from the header before any pixel is
decoded: the picture, and for a bundle that pads to a square (LLaVA-1.5) the square it becomes
(a 170-byte PNG of 30000x1 is a 900-megapixel canvas once padded), and its resize. Only the
formats people send photos in are opened (``IMAGE_FORMATS``); 16- and 32-bit images are scaled to
8 bits, not clipped. Refusals are domain errors naming the ``image``: each front end words them
for its clients (the server as ``image_url`` with 400 or 413, Triton as the tensor).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from ccra_export.core.image_preprocess import (
    DECODE_ERRORS,
    IMAGE_FORMATS,
    ImageProcessorConfig,
    ImageReadError,
    to_rgb,
    working_pixels,
)
from ccra_export.runtime.inputs import InputError


class ImageTooLargeError(InputError):
    """More pixels than the deployment decodes (a decompression bomb, or just too big): the
    picture, or the square it is padded to (``pixels``)."""

    def __init__(self, width: int, height: int, limit: int, pixels: int | None = None) -> None:
        pixels = width * height if pixels is None else pixels
        side = max(width, height)
        square = f", a {side}x{side} square once padded ({pixels} pixels)" if pixels > width * height else ""
        super().__init__(f"{width}x{height} pixels{square}; the limit is {limit}", field="image")
        self.width, self.height, self.limit, self.pixels = width, height, limit, pixels


def decode_image(data: bytes, max_pixels: int, processor: ImageProcessorConfig | None = None) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB whose preprocessing (``processor``'s pad-to-square and
    resize) holds at most ``max_pixels`` pixels, refused from the header before decoding."""
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: a refusal, not a line on stderr
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as handle:
                width, height = handle.size
                pixels = working_pixels((width, height), processor)
                if pixels > max_pixels:
                    raise ImageTooLargeError(width, height, max_pixels, pixels)
                handle.load()
                return to_rgb(handle)
    except InputError:
        raise
    except ImageReadError as exc:
        raise InputError(exc.problem, field="image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"over {Image.MAX_IMAGE_PIXELS} pixels, Pillow's decompression-bomb bound", field="image"
        ) from None
    except UnidentifiedImageError:
        formats = ", ".join(IMAGE_FORMATS)
        raise InputError(f"not a readable image (expected one of {formats})", field="image") from None
    except DECODE_ERRORS as exc:  # a malformed file: Pillow raises SyntaxError, struct.error, ... too
        raise InputError(f"not a readable image ({type(exc).__name__})", field="image") from None
