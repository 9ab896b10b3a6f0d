"""Overlays a person can read: the photo under light class colours, outlines, a legend.

The first overlays painted every class at half opacity over the whole photo
with no legend, so the photo was hard to see and the colours could only be
decoded through summary.json. Here the photo shows through (ALPHA), a thin
line marks where one class meets another, and images large enough to hold it
get a legend of the classes present (colour, name, share of the image).
Pillow and numpy only: infer imports neither torch nor transformers.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segdeploy.runtime.palette import overlay as blend

ALPHA = 0.4  # class colour weight: the photo keeps 60% of each pixel
OUTLINE = (255, 255, 255)
# A legend is drawn from this short side up; below it, it would hide the photo
# (the classes and their shares are in summary.json either way).
LEGEND_MIN_SIDE = 192
LEGEND_MAX_ROWS = 10


def render_overlay(
    image: Image.Image | np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    id2label: dict[int, str],
) -> Image.Image:
    """The RGB overlay of `labels` on `image` (same height and width): light colours,
    outlines between classes, and a legend on images of LEGEND_MIN_SIDE and up."""
    out = np.array(blend(image, labels, palette, alpha=ALPHA))
    out[class_edges(labels, width=2 if min(labels.shape) >= 512 else 1)] = OUTLINE
    result = Image.fromarray(out, mode="RGB")
    if min(labels.shape) >= LEGEND_MIN_SIDE:
        draw_legend(result, labels, palette, id2label)
    return result


def class_edges(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """HxW bool: pixels whose right or lower neighbour (within `width`) has another class."""
    edges = np.zeros(labels.shape, bool)
    for step in range(1, width + 1):
        horizontal = labels[:, step:] != labels[:, :-step]
        vertical = labels[step:, :] != labels[:-step, :]
        edges[:, :-step] |= horizontal
        edges[:-step, :] |= vertical
    return edges


def legend_rows(
    labels: np.ndarray, id2label: dict[int, str], max_rows: int = LEGEND_MAX_ROWS
) -> list[tuple[int | None, str]]:
    """(class id, text) per legend row, largest share first; a last row counts the rest."""
    counts = np.bincount(labels.ravel().astype(np.int64))
    present = np.flatnonzero(counts)
    order = present[np.argsort(-counts[present], kind="stable")]
    total = labels.size
    rows: list[tuple[int | None, str]] = [
        (int(c), f"{id2label.get(int(c), str(int(c)))}  {100 * counts[c] / total:.0f}%")
        for c in order[:max_rows]
    ]
    if len(order) > max_rows:
        rows[-1] = (None, f"+{len(order) - max_rows + 1} more classes")
    return rows


def draw_legend(
    image: Image.Image, labels: np.ndarray, palette: np.ndarray, id2label: dict[int, str]
) -> None:
    """Draw the legend in the top-left corner of `image`, in place."""
    side = min(image.size)
    size = int(np.clip(side // 24, 11, 28))
    font = _font(size)
    rows = legend_rows(labels, id2label)
    pad, swatch, line = size // 2, size, int(size * 1.35)
    measure = ImageDraw.Draw(image)
    text_w = max(measure.textlength(text, font=font) for _, text in rows)
    width = int(pad * 3 + swatch + text_w)
    height = pad * 2 + line * len(rows)
    # Only the panel's corner is composited (a whole-image RGBA pass cost 3 ms a photo).
    box = (pad, pad, min(image.width, pad + width), min(image.height, pad + height))
    corner = image.crop(box).convert("RGBA")
    panel = Image.new("RGBA", corner.size, (255, 255, 255, 215))
    draw = ImageDraw.Draw(panel)
    for i, (cls, text) in enumerate(rows):
        top = pad + i * line
        if cls is not None:
            colour = tuple(int(v) for v in palette[cls % len(palette)])
            draw.rectangle(
                (pad, top, pad + swatch, top + swatch), fill=(*colour, 255), outline="black"
            )
        draw.text((pad * 2 + swatch, top), text, fill=(0, 0, 0, 255), font=font)
    image.paste(Image.alpha_composite(corner, panel).convert("RGB"), box[:2])


@functools.lru_cache(maxsize=8)
def _font(size: int):
    try:  # Pillow's bundled scalable font (needs FreeType, which its wheels include)
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()
