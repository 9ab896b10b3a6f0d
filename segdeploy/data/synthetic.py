"""Built-in synthetic segmentation data: textured shapes on a cluttered background.

It is the offline default for `segdeploy demo` and for the tests. Each class
has its own colour family and texture, so a small SegFormer learns it in a few
hundred steps, while the background clutter (grey-brown blobs and lines) keeps
it from being trivial. Label maps are exact: a pixel's label is the class of
the last shape drawn over it.

Sample `i` of seed `s` depends only on `(s, i)`, so any subset can be made
without making the rest, and the data is the same on every machine.
Drawn with numpy masks rather than Pillow's ImageDraw because the textures and
the label map must come from the very same boolean mask.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

ID2LABEL: dict[int, str] = {0: "background", 1: "disc", 2: "box", 3: "triangle", 4: "ring"}
NUM_CLASSES = len(ID2LABEL)

# Saturated colour per object class; the clutter is desaturated, so colour is a cue
# but texture and shape matter too (each colour is jittered per instance).
_CLASS_RGB = {
    1: (220, 50, 40),
    2: (40, 190, 70),
    3: (50, 80, 225),
    4: (235, 200, 30),
}


def _texture(cls: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A brightness pattern in [0.55, 1.1] that differs per class."""
    period = rng.uniform(6.0, 10.0)
    if cls == 1:  # fine noise
        return 0.75 + 0.3 * rng.random(yy.shape, dtype=np.float32)
    if cls == 2:  # stripes
        return 0.8 + 0.25 * (np.sin(2 * np.pi * yy / period) > 0)
    if cls == 3:  # checkerboard
        return 0.6 + 0.45 * (((yy // (period / 2)) + (xx // (period / 2))) % 2)
    # dots
    return 0.65 + 0.4 * ((np.sin(2 * np.pi * yy / period) * np.sin(2 * np.pi * xx / period)) > 0.3)


def _shape_mask(
    cls: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float
) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if cls == 1:
        return dy * dy + dx * dx <= r * r
    # Rotate coordinates for the polygonal shapes.
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if cls == 2:
        return (np.abs(u) <= r) & (np.abs(v) <= 0.7 * r)
    if cls == 3:
        # Equilateral triangle: inside the three half-planes.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = angle + k * 2 * np.pi / 3
            inside &= (np.cos(a) * dx + np.sin(a) * dy) <= 0.5 * r
        return inside
    d2 = dy * dy + dx * dx
    return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)


def _background(h: int, w: int, yy, xx, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(70, 150)
    tint = rng.uniform(-12, 12, 3)
    gy, gx = rng.uniform(-40, 40, 2)
    img = (base + tint).astype(np.float32) + (gy * yy / h + gx * xx / w)[..., None]
    # Uniform noise: as good a texture as Gaussian here, and several times cheaper to draw.
    img += 30 * (rng.random((h, w, 1), dtype=np.float32) - 0.5)
    # Clutter: grey-brown blobs and bars that belong to the background class.
    for _ in range(rng.integers(4, 9)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.03, 0.15) * h, rng.uniform(0.03, 0.15) * w
        grey = rng.uniform(40, 200)
        colour = grey + np.array([rng.uniform(0, 25), rng.uniform(0, 15), 0.0])
        if rng.random() < 0.5:
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            m = (np.abs(yy - cy) <= ry * 0.15) & (np.abs(xx - cx) <= rx * 2)
        img[m] = colour
    return img


def synthetic_sample(
    index: int, seed: int = 0, size: int | tuple[int, int] = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image HxWx3 uint8, label HxW uint8) for sample `index` of `seed`.

    `size` is an int (square) or (height, width). Sample `index` always contains
    class `1 + index % 4`, so any run of 4 consecutive samples shows every class.
    """
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = _background(h, w, yy, xx, rng)
    label = np.zeros((h, w), dtype=np.uint8)

    n_objects = int(rng.integers(2, 5))
    classes = [1 + index % 4] + [int(c) for c in rng.integers(1, NUM_CLASSES, n_objects - 1)]
    short = min(h, w)
    for cls in classes:
        r = rng.uniform(0.12, 0.24) * short
        cy, cx = rng.uniform(r * 0.6, h - r * 0.6), rng.uniform(r * 0.6, w - r * 0.6)
        mask = _shape_mask(cls, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        colour = np.asarray(_CLASS_RGB[cls], dtype=np.float32) + rng.normal(0, 12, 3)
        shade = _texture(cls, yy[mask], xx[mask], rng)
        img[mask] = colour * shade[:, None]
        label[mask] = cls
    img += 14 * (rng.random(img.shape, dtype=np.float32) - 0.5)  # colour noise over everything
    return np.clip(img, 0, 255).astype(np.uint8), label


def synthetic_samples(
    n: int, seed: int = 0, size: int | tuple[int, int] = 256, start: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Samples `start .. start + n - 1` of `seed`."""
    for i in range(start, start + n):
        yield synthetic_sample(i, seed=seed, size=size)


def write_synthetic_folder(
    root: str | os.PathLike,
    n_train: int = 200,
    n_val: int = 40,
    seed: int = 0,
    size: int | tuple[int, int] = 256,
) -> Path:
    """Write an ADE20K-layout folder (images/<split>/*.png, annotations/<split>/*.png, id2label.json).

    Train and val use disjoint sample indices of the same seed.
    """
    root = Path(root)
    splits = {"train": (0, n_train), "validation": (n_train, n_val)}
    for split, (start, n) in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(synthetic_samples(n, seed, size, start=start)):
            stem = f"synthetic_{start + i:05d}"
            Image.fromarray(img).save(root / "images" / split / f"{stem}.png")
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{stem}.png")
    (root / "id2label.json").write_text(json.dumps({str(k): v for k, v in ID2LABEL.items()}))
    return root
