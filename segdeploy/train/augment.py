"""Training augmentation that keeps an image and its label map aligned.

Colour jitter touches the image only; the random zoom-crop and the horizontal
flip move image and labels together (labels always with nearest-neighbour, so
no new class ids appear). Evaluation uses `resize_pair` alone.

Written with Pillow and numpy because torchvision has no CPU-only wheel that
matches our torch pin; these few operations do not justify a second stack.
Randomness comes from an explicit `numpy.random.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class AugmentParams:
    """Strength of each augmentation; 0 (or 1.0 for max_zoom) turns one off.

    The colour values are those of the Hugging Face guide's
    `ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.1)`:
    a factor drawn from [1 - x, 1 + x], and a hue shift within +-hue of a full turn.
    """

    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.1
    max_zoom: float = 1.5  # crop a window 1/zoom of each side, zoom drawn from [1, max_zoom]
    flip: float = 0.5  # probability of a horizontal flip


def color_jitter(image: Image.Image, rng: np.random.Generator, p: AugmentParams) -> Image.Image:
    """Random brightness, contrast, saturation and hue, in that order."""
    image = image.convert("RGB")
    for amount, enhancer in (
        (p.brightness, ImageEnhance.Brightness),
        (p.contrast, ImageEnhance.Contrast),
        (p.saturation, ImageEnhance.Color),
    ):
        if amount > 0:
            image = enhancer(image).enhance(rng.uniform(max(0.0, 1 - amount), 1 + amount))
    if p.hue > 0:
        hsv = np.asarray(image.convert("HSV")).copy()
        shift = int(round(rng.uniform(-p.hue, p.hue) * 256))
        # Hue is an angle, stored in a byte: uint8 arithmetic wraps it round the circle.
        hsv[..., 0] = hsv[..., 0] + np.uint8(shift % 256)
        image = Image.fromarray(hsv, mode="HSV").convert("RGB")
    return image


def random_crop_box(
    width: int, height: int, rng: np.random.Generator, max_zoom: float
) -> tuple[float, float, float, float]:
    """A (left, top, right, bottom) window of 1/zoom of each side at a random place."""
    zoom = rng.uniform(1.0, max(1.0, max_zoom))
    w, h = width / zoom, height / zoom
    left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return (left, top, left + w, top + h)


def resize_pair(
    image: Image.Image,
    labels: Image.Image,
    size: int,
    box: tuple[float, float, float, float] | None = None,
) -> tuple[Image.Image, Image.Image]:
    """Crop both to `box` (default: all) and resize to size x size; labels by nearest."""
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    labels = labels.resize((size, size), Image.Resampling.NEAREST, box=box)
    return image, labels


def augment_pair(
    image: Image.Image,
    labels: Image.Image,
    size: int,
    rng: np.random.Generator,
    params: AugmentParams | None = None,
) -> tuple[Image.Image, Image.Image]:
    """Jitter the image, zoom-crop and maybe flip both, and resize both to size x size."""
    params = params or AugmentParams()
    image = color_jitter(image, rng, params)
    box = random_crop_box(image.width, image.height, rng, params.max_zoom)
    image, labels = resize_pair(image, labels, size, box)
    if rng.random() < params.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        labels = labels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, labels


def labels_to_image(labels: np.ndarray) -> Image.Image:
    """An int32 ("I" mode) image of class ids, so that Pillow can crop, resize and flip it."""
    return Image.fromarray(np.ascontiguousarray(labels, dtype=np.int32))
