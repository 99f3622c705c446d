"""``image_url`` content parts -> a decoded photo, within the server's limits.

- ``data:image/png;base64,...`` / ``data:image/jpeg;base64,...``: decoded in memory;
- ``http(s)://``: fetched with a size cap and a time limit (off unless ``--allow-image-urls``);
- a local path (``file://`` or plain): only under ``--allow-image-dir``, symlinks resolved.
The pixel count is checked from the header, before the pixels are decoded.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ccra_export.runtime.inputs import InputError
from ccra_export.serve.images import ImageTooLargeError, decode_image
from ccra_export.serve.openai.protocol import ApiError

PARAM = "messages.content.image_url"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    fetch_timeout_s: float = 10.0
    allow_urls: bool = False
    allow_dir: Path | None = None


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        return decode_image(data, limits.max_pixels)
    except ImageTooLargeError as exc:
        raise ApiError(413, f"image is {exc.message}", param=PARAM) from None
    except InputError as exc:
        raise ApiError(400, f"image_url: {exc.message}", param=PARAM) from None


def _from_data_url(url: str, limits: ImageLimits) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not header.startswith("data:image/"):
        raise ApiError(400, "image_url: expected data:image/png;base64,... or data:image/jpeg;base64,...", param=PARAM)
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ApiError(413, f"image is larger than {limits.max_bytes} bytes", param=PARAM)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url: invalid base64", param=PARAM) from None


def _fetch(url: str, limits: ImageLimits) -> bytes:
    if not limits.allow_urls:
        raise ApiError(
            400,
            "image_url: http(s) URLs are not fetched by this server (it was started without allowing them)",
            param=PARAM,
        )
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout_s) as response:
            data = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, TimeoutError, ValueError, OSError) as exc:
        raise ApiError(400, f"image_url: could not fetch it ({type(exc).__name__})", param=PARAM) from None
    if len(data) > limits.max_bytes:
        raise ApiError(413, f"image is larger than {limits.max_bytes} bytes", param=PARAM)
    return data


def _from_path(url: str, limits: ImageLimits) -> bytes:
    if limits.allow_dir is None:
        raise ApiError(
            400,
            "image_url: local paths are not served (the server was started without an image directory)",
            param=PARAM,
        )
    path = Path(url.removeprefix("file://")).resolve()
    root = limits.allow_dir.resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ApiError(400, "image_url: no such image under the allowed directory", param=PARAM)
    if path.stat().st_size > limits.max_bytes:
        raise ApiError(413, f"image is larger than {limits.max_bytes} bytes", param=PARAM)
    return path.read_bytes()


def load_image_url(url: str, limits: ImageLimits) -> tuple[Image.Image, bytes]:
    """The photo and its encoded bytes (whose hash identifies it in a conversation)."""
    if url.startswith("data:"):
        data = _from_data_url(url, limits)
    elif url.startswith(("http://", "https://")):
        data = _fetch(url, limits)
    else:
        data = _from_path(url, limits)
    return _decode(data, limits), data
