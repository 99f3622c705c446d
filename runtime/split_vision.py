"""A split bundle's vision stage: the CLIP tower once per image (cached), CCRA's head per question.

``SplitVision`` is a ``VisionBackend`` with the single graph's interface (pixel_values,
text_embeds, text_mask -> visual_tokens, lpwca_attention), so the pipeline, the server, parity and
``check`` run a split bundle unchanged. Images of a batch are looked up one by one; the misses
run through the tower together, then the whole batch through the head.
"""

from __future__ import annotations

import numpy as np

from ccra_export.core.vision_graphs import PIXEL_VALUES, TOWER_FEATURES
from ccra_export.runtime.tower_cache import TowerCache, image_key
from ccra_export.runtime.vision_backend import VisionBackend


class SplitVision(VisionBackend):
    def __init__(self, tower: VisionBackend, head: VisionBackend, cache: TowerCache | None = None) -> None:
        self.tower, self.head = tower, head
        self.cache = cache if cache is not None else TowerCache(0)
        self.name = tower.name
        self._dtypes = {PIXEL_VALUES: tower.input_dtypes[PIXEL_VALUES]}
        self._dtypes.update({k: v for k, v in head.input_dtypes.items() if k != TOWER_FEATURES})

    @property
    def description(self) -> str:
        cache = f"tower cache {self.cache.max_bytes / (1 << 20):g} MiB" if self.cache.max_bytes else "no tower cache"
        return f"{self.tower.description}; vision tower + CCRA head, {cache}"

    @property
    def providers(self) -> list[str]:
        """The tower's execution providers (ONNX Runtime), which ``--backend ort-trt`` checks."""
        return list(getattr(self.tower, "providers", []))

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        return dict(self._dtypes)

    def tower_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """The tower's output for a batch of images, from the cache where it has them."""
        keys = [image_key(row) for row in pixel_values]
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        if missing:
            computed = self.tower.run({PIXEL_VALUES: pixel_values[missing]})[TOWER_FEATURES]
            for i, row in zip(missing, computed, strict=True):
                found[i] = row
                self.cache.put(keys[i], row)
        return np.stack(found)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        head_feeds = {k: v for k, v in feeds.items() if k != PIXEL_VALUES}
        head_feeds[TOWER_FEATURES] = self.tower_features(feeds[PIXEL_VALUES])
        return self.head.run(head_feeds)
