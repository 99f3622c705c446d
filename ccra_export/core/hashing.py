"""Content hashes recorded in manifests (ONNX files, plugin libraries, source weights)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class TensorDigest:
    """sha256 over (name, dtype, shape, bytes) of named tensors, in name order.

    Hashing the tensors a build actually reads (not whole multi-GB shards, most of which hold the
    language model) makes the source hash cheap and independent of how the checkpoint is sharded.
    """

    def __init__(self) -> None:
        self._items: dict[str, tuple[str, tuple[int, ...], bytes]] = {}

    def add(self, name: str, dtype: str, shape: tuple[int, ...], data: bytes) -> None:
        self._items[name] = (dtype, shape, hashlib.sha256(data).digest())

    def hexdigest(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self._items):
            dtype, shape, data_hash = self._items[name]
            digest.update(f"{name}|{dtype}|{shape}|".encode())
            digest.update(data_hash)
        return digest.hexdigest()
