"""An LRU cache of CLIP-tower outputs, keyed by the image's content hash and bounded in bytes.

The tower's output for one image at llava-1.5-7b sizes is L x 576 x 1024 values (23 layers: 54 MB
in FP32, 27 MB in FP16), so the bound is in bytes, not entries. The key is a BLAKE2b digest of the
preprocessed pixels as the tower receives them (dtype and shape included): the same photo sent
twice, re-encoded losslessly, or uploaded by two clients hits; any changed pixel misses.
Thread-safe: the server's workers share one cache.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from ccra_export.core.errors import ConfigError
from ccra_export.core.manifest_schema import Manifest
from ccra_export.core.vision_graphs import is_split, part_records

MIB = 1 << 20
#: ``--tower-cache-mib`` default: a few llava-1.5-7b images (27-54 MB each) within a Jetson's shared memory.
DEFAULT_TOWER_CACHE_MIB = 256


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int
    evictions: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def tower_bytes_per_image(manifest: Manifest) -> int:
    """Bytes one image's tower output takes in the cache (0 for a single-graph bundle: no tower)."""
    if not is_split(manifest):
        return 0
    spec = part_records(manifest)[0]["outputs"][0]
    values = int(np.prod([d for d in spec["shape"] if isinstance(d, int)]))
    return values * np.dtype(spec["dtype"]).itemsize


def image_key(pixels: np.ndarray) -> str:
    """Content hash of one preprocessed image (``[C, H, W]``), its dtype and shape included."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


class TowerCache:
    """Least-recently-used tower outputs; ``max_bytes == 0`` disables it (every lookup misses)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"tower cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    @classmethod
    def from_mib(cls, mib: float) -> TowerCache:
        if not isinstance(mib, int | float) or not math.isfinite(mib) or mib < 0:
            raise ConfigError(
                "expected a finite number of MiB, 0 (no cache) or more", field="tower_cache_mib", value=mib
            )
        return cls(int(mib * MIB))

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        """Keep a read-only copy of ``value``; evict the least recently used until it fits. A value
        larger than the whole cache is not kept."""
        size = value.nbytes
        if size > self.max_bytes:
            return
        stored = np.array(value, copy=True)
        stored.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._evictions += 1
            self._entries[key] = stored
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, len(self._entries), self._bytes, self.max_bytes, self._evictions
            )
