"""`ccra-export explain`: CCRA's LPWCA attention for a question about a photo, drawn.

Writes into ``--out`` (staged, renamed when complete):

    overlay.png        the photo with the map (summed over layers) over it as a heat map, mapped back
                       through the centre crop and LLaVA's pad-to-square, the top-k patches outlined
    layers.png         one small map per ViT layer CCRA read, on one colour scale
    layer_shares.png   each layer's share of the attention
    attention.npy      the map [layers, rows, cols], float32 (sums to 1)
    attention.json     layer shares, top patches in image pixels, entropy, the question and image

Pillow draws the overlay; matplotlib (the ``[explain]`` extra) the colour map and the charts.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ccra_export.core import atomic
from ccra_export.core.errors import BundleError, Remedy
from ccra_export.core.extras import require
from ccra_export.core.manifest import read_manifest
from ccra_export.runtime.attention import AttentionMap
from ccra_export.runtime.inputs import load_image
from ccra_export.runtime.vlm_pipeline import Pipeline, no_attention_map, outputs_attention_map

COLORMAP = "inferno"
MAX_SIDE = 1600  # overlay pixels on the long side: a 24 MP photo is drawn at a size a person opens
OUTPUTS = ("overlay.png", "layers.png", "layer_shares.png", "attention.npy", "attention.json")


def require_matplotlib(what: str) -> None:
    """Refuse ``what`` before any work when the ``[explain]`` extra (matplotlib) is missing."""
    require("explain", what)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def heat_image(amap: AttentionMap, size: tuple[int, int]) -> np.ndarray:
    """The per-patch map as a [height, width] array over the photo (0 where no patch looked: the
    padding and what the centre crop cut), bilinear inside the crop, at ``size`` = (width, height)."""
    width, height = size
    sx, sy = width / amap.geometry.image_width, height / amap.geometry.image_height
    grid = amap.per_patch()
    x0, y0 = amap.geometry.to_image(0, 0)
    x1, y1 = amap.geometry.to_image(amap.geometry.crop_width, amap.geometry.crop_height)
    region = (max(1, round((x1 - x0) * sx)), max(1, round((y1 - y0) * sy)))
    patch_map = Image.fromarray(grid.astype(np.float32), mode="F").resize(region, Image.Resampling.BILINEAR)
    canvas = Image.new("F", (width, height), 0.0)
    canvas.paste(patch_map, (round(x0 * sx), round(y0 * sy)))
    return np.asarray(canvas, dtype=np.float32)


def overlay(image: Image.Image, amap: AttentionMap, top_k: int = 5, alpha: float = 0.55) -> Image.Image:
    """The photo, the heat map blended over it where the map is high, the top-k patches outlined."""
    from matplotlib import colormaps

    scale = min(1.0, MAX_SIDE / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    photo = image.convert("RGB").resize(size, Image.Resampling.LANCZOS) if scale < 1 else image.convert("RGB")
    heat = heat_image(amap, size)
    peak = float(heat.max()) or 1.0
    level = heat / peak
    colours = colormaps[COLORMAP](level)[..., :3]
    weight = (alpha * np.sqrt(level))[..., None]  # faint where the map is low, so the photo stays readable
    blended = np.asarray(photo, dtype=np.float32) / 255 * (1 - weight) + colours * weight
    picture = Image.fromarray(np.clip(blended * 255 + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    line = max(2, round(max(size) / 300))
    for patch in amap.top_patches(top_k):
        left, top, right, bottom = (v * scale for v in patch["box"])
        if right - left < 1 or bottom - top < 1:
            continue  # a patch that saw only LLaVA's padding has no pixels in the photo
        draw.rectangle([left, top, right - 1, bottom - 1], outline=(0, 255, 170), width=line)
        draw.text((left + line + 1, top + line), str(patch["rank"]), fill=(0, 255, 170))
    return picture


def layer_strip(amap: AttentionMap) -> bytes:
    """PNG: the per-layer maps on one colour scale, up to 8 a row."""
    plt = _pyplot()
    count = len(amap.layers)
    columns = min(8, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.7 * rows + 0.4), squeeze=False)
    top = float(amap.weights.max()) or 1.0
    for index, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if index < count:
            ax.imshow(amap.weights[index], cmap=COLORMAP, vmin=0, vmax=top, interpolation="nearest")
            ax.set_title(f"layer {amap.layers[index]}", fontsize=8)
    figure.suptitle("LPWCA attention per ViT layer (one colour scale)", fontsize=10)
    return _png(plt, figure)


def layer_share_chart(amap: AttentionMap) -> bytes:
    """PNG: a bar per layer, its share of the attention."""
    plt = _pyplot()
    shares = amap.layer_shares()
    figure, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(shares) + 1.5), 3.0))
    ax.bar([str(layer) for layer in amap.layers], shares, color="#c2410c")
    ax.axhline(1 / len(shares), color="grey", linewidth=0.8, linestyle="--", label="uniform")
    ax.set_xlabel("ViT layer")
    ax.set_ylabel("share of attention")
    ax.legend(frameon=False, fontsize=8)
    figure.tight_layout()
    return _png(plt, figure)


def _png(plt: Any, figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


@dataclass
class Explanation:
    out: Path
    summary: dict[str, Any]


def write_explanation(
    out: Path, image: Image.Image, amap: AttentionMap, record: dict[str, Any], top_k: int, force: bool
) -> dict[str, Any]:
    """The five files into ``out``, written in a staging directory and renamed when complete."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise BundleError(
            "exists and is not an empty directory; pass {force} to replace it",
            field="out",
            value=out,
            mentions=("force",),
        )
    summary = {**record, **amap.summary(top_k)}
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        with atomic.staged_directory(out, replace=force) as stage:
            overlay(image, amap, top_k).save(stage / "overlay.png")
            (stage / "layers.png").write_bytes(layer_strip(amap))
            (stage / "layer_shares.png").write_bytes(layer_share_chart(amap))
            np.save(stage / "attention.npy", amap.weights.astype(np.float32))
            (stage / "attention.json").write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        raise BundleError(f"cannot write ({exc.strerror or exc})", field="out", value=out) from None
    return summary


def explain(
    bundle: Path,
    image_path: Path,
    prompt: str,
    out: Path,
    *,
    top_k: int = 5,
    backend: str = "auto",
    force: bool = False,
) -> Explanation:
    require_matplotlib("ccra-export explain")
    check_out_apart(out, bundle=bundle, image=image_path)
    manifest = read_manifest(bundle)
    if not outputs_attention_map(manifest):
        raise no_attention_map(Path(bundle))
    if not manifest["language_model"]:
        raise BundleError(
            "holds no tokenizer or token embeddings: CCRA's map is conditioned on the question's token "
            "embeddings, which a bundle carries with its language model; rebuild it with one",
            field="bundle",
            value=bundle,
            remedy=Remedy("build", (("lm_precision", "int4"),), complete=False),
        )
    image = load_image(image_path)
    pipeline = Pipeline.from_bundle(bundle, backend=backend)
    amap = pipeline.attention(image, prompt)
    record = {"bundle": str(bundle), "image": str(image_path), "prompt": prompt}
    return Explanation(Path(out), write_explanation(out, image, amap, record, top_k, force))


def check_out_apart(out: Path, **inputs: Path) -> None:
    """Refuse an output directory that is, holds or sits inside one of the ``inputs`` (the bundle,
    the image): replacing it would delete what it explains."""
    atomic.refuse_overlap(out, "out", "write the explanation somewhere else", **inputs)


def save_overlay(path: Path, image: Image.Image, amap: AttentionMap, top_k: int = 5) -> None:
    """`run --attention-map FILE.png`: the overlay alone, written to a temporary sibling and renamed."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise BundleError("expected a .png file name", field="attention_map", value=path)
    try:
        with atomic.temporary_sibling(path) as temporary:
            overlay(image, amap, top_k).save(temporary, format="PNG")
    except OSError as exc:
        raise BundleError(f"cannot write ({exc.strerror or exc})", field="attention_map", value=path) from None
