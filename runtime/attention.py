"""CCRA's LPWCA attention map with its geometry: which photo pixels each patch saw.

Every CCRA graph outputs ``lpwca_attention`` [batch, L, N]: the joint softmax over the L selected
ViT layers and the N patches (it sums to 1 per image), float32 at every precision (its mean
1/(L*N) is below FP16's smallest normal at llava-1.5-7b sizes); FP16 bundles built before that
give it in float16, which ``from_output`` reads the same way. Patches tile the processor's crop in a
square grid; ``core.image_preprocess.crop_geometry`` maps the crop back through the centre crop,
the resize and LLaVA's pad-to-square, so a patch is a rectangle of the original image.
numpy only: drawing it is the ``explain`` workflow's (matplotlib, Pillow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ccra_export.core.image_preprocess import CropGeometry


@dataclass(frozen=True)
class AttentionMap:
    weights: np.ndarray  # [L, rows, cols] float64, sums to 1
    layers: tuple[int, ...]  # the ViT layers (hidden_states indices) CCRA read, in map order
    geometry: CropGeometry

    @classmethod
    def from_output(cls, attention: np.ndarray, layers: tuple[int, ...], geometry: CropGeometry) -> AttentionMap:
        """One image's ``lpwca_attention`` row [L, N] (N a square number of patches), of any float
        type (an older FP16 bundle's float16 map included), as float64."""
        attention = np.asarray(attention, dtype=np.float64)
        if attention.ndim != 2 or attention.shape[0] != len(layers):
            raise ValueError(f"attention map of shape {attention.shape}: expected [{len(layers)}, patches]")
        side = math.isqrt(attention.shape[1])
        if side * side != attention.shape[1]:
            raise ValueError(f"attention map over {attention.shape[1]} patches: not a square grid")
        return cls(attention.reshape(len(layers), side, side), tuple(layers), geometry)

    @property
    def grid(self) -> tuple[int, int]:
        return self.weights.shape[1], self.weights.shape[2]

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Patch (row, col) as (left, top, right, bottom) in original-image pixels, clipped to it."""
        rows, cols = self.grid
        width, height = self.geometry.crop_width / cols, self.geometry.crop_height / rows
        return self.geometry.box(col * width, row * height, (col + 1) * width, (row + 1) * height)

    def per_patch(self) -> np.ndarray:
        """[rows, cols]: each patch's attention summed over layers (sums to 1)."""
        return self.weights.sum(axis=0)

    def layer_shares(self) -> np.ndarray:
        """[L]: each layer's share of the attention (sums to 1)."""
        return self.weights.sum(axis=(1, 2))

    def _patches_in_photo(self) -> tuple[float, list[tuple[float, tuple[float, float, float, float]]]]:
        """A whole patch's area in photo pixels, and each patch's (weight, box clipped to the photo)."""
        rows, cols = self.grid
        width, height = self.geometry.crop_width / cols, self.geometry.crop_height / rows
        full = width * self.geometry.scale_x * height * self.geometry.scale_y
        per_patch = self.per_patch()
        return full, [(per_patch[r, c], self.patch_box(r, c)) for r in range(rows) for c in range(cols)]

    def share_outside_image(self) -> float:
        """The attention on what is not the photo: LLaVA's pad-to-square padding (by patch area)."""
        full, patches = self._patches_in_photo()
        outside = 0.0
        for weight, (left, top, right, bottom) in patches:
            outside += weight * max(0.0, 1.0 - (right - left) * (bottom - top) / full)
        return float(outside)

    def share_in_box(self, box: tuple[float, float, float, float]) -> float:
        """The attention inside ``box`` (left, top, right, bottom in original-image pixels): each
        patch's weight times the fraction of its area in the photo that the box covers (padding
        counts as outside). Compare with ``box_share`` of the same box: uniform attention gives
        about that much."""
        full, patches = self._patches_in_photo()
        inside = 0.0
        for weight, (left, top, right, bottom) in patches:
            overlap_w = max(0.0, min(right, box[2]) - max(left, box[0]))
            overlap_h = max(0.0, min(bottom, box[3]) - max(top, box[1]))
            inside += weight * overlap_w * overlap_h / full
        return float(inside)

    def box_share(self, box: tuple[float, float, float, float]) -> float:
        """The fraction of the photo's area that ``box`` covers."""
        area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
        return area / float(self.geometry.image_width * self.geometry.image_height)

    def entropy(self) -> float:
        """Entropy of the joint map in nats (0: one position; log(L*N): uniform)."""
        p = self.weights[self.weights > 0]
        return float(-(p * np.log(p)).sum())

    def top_patches(self, k: int = 5) -> list[dict]:
        """The k patches with most attention (summed over layers), with their boxes in the photo."""
        flat = self.per_patch().ravel()
        cols = self.grid[1]
        order = np.argsort(-flat, kind="stable")[:k]
        return [
            {
                "rank": rank + 1,
                "row": int(index // cols),
                "col": int(index % cols),
                "weight": float(flat[index]),
                "box": [round(v, 2) for v in self.patch_box(int(index // cols), int(index % cols))],
            }
            for rank, index in enumerate(order)
        ]

    def summary(self, k: int = 5) -> dict:
        rows, cols = self.grid
        positions = self.weights.size
        return {
            "image_size": [self.geometry.image_width, self.geometry.image_height],
            "grid": [rows, cols],
            "layers": list(self.layers),
            "layer_shares": [float(v) for v in self.layer_shares()],
            "entropy_nats": self.entropy(),
            "entropy_normalised": self.entropy() / math.log(positions) if positions > 1 else 0.0,
            "share_outside_image": self.share_outside_image(),
            "top_patches": self.top_patches(k),
        }
