"""``image_url`` content parts -> a decoded photo, within the server's limits.

- ``data:image/png;base64,...`` / ``data:image/jpeg;base64,...``: decoded in memory;
- ``http(s)://``: fetched with a size cap and one total deadline for the whole fetch (connection,
  headers and body: a server that drips a byte every second is cut off at the deadline, not kept
  alive by each byte), off unless ``--allow-image-urls``;
- a local path (``file://`` with an empty or ``localhost`` host and percent-escapes decoded, or a
  plain path taken as written): only under ``--allow-image-dir``, a relative path resolved against
  that directory, symlinks resolved, regular files only (a FIFO would block the read forever).
What preprocessing will hold (the padded square included) is checked from the header, before the
pixels are decoded. Every refusal names the request's field (``messages[0].content[1].image_url``).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ccra_export.core.image_preprocess import ImageProcessorConfig
from ccra_export.runtime.inputs import InputError
from ccra_export.serve.images import ImageTooLargeError, decode_image
from ccra_export.serve.openai.protocol import ApiError

PARAM = "messages[0].content"
#: bytes read from an image URL's response at a time
_READ_SIZE = 64 << 10


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    fetch_timeout_s: float = 10.0  # the whole fetch: connecting, the headers and the body
    allow_urls: bool = False
    allow_dir: Path | None = None


def decode_image_bytes(
    data: bytes, limits: ImageLimits, processor: ImageProcessorConfig | None = None, param: str = PARAM
) -> Image.Image:
    """The bounded decoder's refusals as the request's: 413 for too many pixels, 400 otherwise."""
    try:
        return decode_image(data, limits.max_pixels, processor)
    except ImageTooLargeError as exc:
        raise ApiError(413, f"{param}: the image is {exc.message}", param=param) from None
    except InputError as exc:
        raise ApiError(400, f"{param}: {exc.message}", param=param) from None


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    return decode_image_bytes(data, limits)


def _from_data_url(url: str, limits: ImageLimits, param: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not header.startswith("data:image/"):
        raise ApiError(400, f"{param}: expected data:image/png;base64,... or data:image/jpeg;base64,...", param=param)
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ApiError(413, f"{param}: the image is larger than {limits.max_bytes} bytes", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: invalid base64", param=param) from None


class _Sockets:
    """The sockets one fetch opened, so that its deadline can shut them from another thread."""

    def __init__(self) -> None:
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False

    def add(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.append(sock)
            if self.closed:  # the deadline passed while this one connected
                _shut(sock)

    def shut_all(self) -> None:
        with self.lock:
            self.closed = True
            for sock in self.open:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread
    except OSError:
        pass


def _opener(sockets: _Sockets) -> urllib.request.OpenerDirector:
    """urllib's opener (redirects, proxies) whose HTTP(S) connections report their sockets."""

    def recorded(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Recorded(base):  # type: ignore[valid-type, misc]
            def connect(self) -> None:
                super().connect()
                sockets.add(self.sock)

        return Recorded

    http_connection, https_connection = recorded(http.client.HTTPConnection), recorded(http.client.HTTPSConnection)

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(http_connection, req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(https_connection, req, context=self._context)

    return urllib.request.build_opener(Http, Https)


def _download(url: str, limits: ImageLimits, sockets: _Sockets, result: dict[str, Any]) -> None:
    """The fetch itself (on its own thread): at most ``max_bytes + 1`` bytes, into ``result``."""
    try:
        with _opener(sockets).open(url, timeout=limits.fetch_timeout_s) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                result["too_large"] = True
                return
            chunks, size = [], 0
            while size <= limits.max_bytes:
                chunk = response.read1(_READ_SIZE)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            result["data"] = b"".join(chunks)
    except Exception as exc:  # urllib's, the socket's, a redirect to a bad scheme...: the client's URL
        result["error"] = exc


def _fetch(url: str, limits: ImageLimits, param: str = PARAM) -> bytes:
    if not limits.allow_urls:
        raise ApiError(
            400,
            f"{param}: http(s) URLs are not fetched by this server (it was started without allowing them)",
            param=param,
        )
    sockets, result = _Sockets(), {}
    fetcher = threading.Thread(target=_download, args=(url, limits, sockets, result), daemon=True, name="ccra-fetch")
    started = time.monotonic()
    fetcher.start()
    fetcher.join(limits.fetch_timeout_s)
    if fetcher.is_alive():  # one deadline for the whole fetch, however the server drips its bytes
        sockets.shut_all()
        fetcher.join(1.0)
        raise ApiError(
            400,
            f"{param}: could not fetch it within {limits.fetch_timeout_s:g} s "
            f"(stopped after {time.monotonic() - started:.1f} s)",
            param=param,
        )
    if "error" in result:
        exc = result["error"]
        raise ApiError(400, f"{param}: could not fetch it ({type(exc).__name__})", param=param)
    data = result.get("data", b"")
    if result.get("too_large") or len(data) > limits.max_bytes:
        raise ApiError(413, f"{param}: the image is larger than {limits.max_bytes} bytes", param=param)
    return data


def _local_path(url: str, root: Path, param: str) -> Path:
    """The file a ``file://`` URL or a plain path names; relative paths are under ``root``."""
    if url.startswith("file:"):
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ApiError(400, f"{param}: a file:// URL names this machine only (file:///path)", param=param)
        text = urllib.parse.unquote(parts.path)
    else:
        text = url
    if not text or "\0" in text:
        raise ApiError(400, f"{param}: not a path", param=param)
    path = Path(text)
    return path if path.is_absolute() else root / path


def _from_path(url: str, limits: ImageLimits, param: str = PARAM) -> bytes:
    if limits.allow_dir is None:
        raise ApiError(
            400,
            f"{param}: local paths are not served (the server was started without an image directory)",
            param=param,
        )
    missing = ApiError(400, f"{param}: no such image under the allowed directory", param=param)
    root = limits.allow_dir.resolve()
    try:
        path = _local_path(url, root, param).resolve()
        if not path.is_relative_to(root):
            raise missing
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise missing  # a directory, a FIFO, a device: nothing to read as an image
            data = handle.read(limits.max_bytes + 1)
    except (OSError, ValueError, RuntimeError):  # no such file, a name too long, a symlink loop...
        raise missing from None
    if len(data) > limits.max_bytes:
        raise ApiError(413, f"{param}: the image is larger than {limits.max_bytes} bytes", param=param)
    return data


def fetch_image_bytes(url: str, limits: ImageLimits, param: str = PARAM) -> bytes:
    """The encoded image an ``image_url`` names, within the byte and time limits."""
    if url.startswith("data:"):
        return _from_data_url(url, limits, param)
    if url.startswith(("http://", "https://")):
        return _fetch(url, limits, param)
    return _from_path(url, limits, param)


def load_image_url(
    url: str, limits: ImageLimits, processor: ImageProcessorConfig | None = None, param: str = PARAM
) -> tuple[Image.Image, bytes]:
    """The photo and its encoded bytes (whose hash identifies it in a conversation)."""
    data = fetch_image_bytes(url, limits, param)
    return decode_image_bytes(data, limits, processor, param), data
