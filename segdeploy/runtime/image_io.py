"""Decode an image file safely into an upright 8-bit RGB Pillow image.

Every failure (empty file, not an image, truncated data, decompression bomb,
unsupported mode) becomes a `SegdeployError(path, reason)`, which `segdeploy
infer` records as a per-file failure and moves on.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segdeploy.errors import SegdeployError

#: Default pixel limit: Pillow's own decompression-bomb threshold (about 89 MP).
#: A 16 kB PNG can claim 50000 x 50000 pixels; we refuse it from the header,
#: before a single pixel is decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

#: The EXIF tag saying how to turn the stored pixels upright.
ORIENTATION = 0x0112

#: Pillow's extensions for formats it can open, for picking images out of folders.
IMAGE_EXTENSIONS = frozenset(
    ext.lower()
    for ext, fmt in Image.registered_extensions().items()
    if fmt in Image.OPEN and fmt not in {"PDF", "EPS", "PSD"}  # not photographs to segment
)


def load_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """The image at `path`, EXIF orientation applied, as mode RGB.

    Mode conversion: L, 1, P, CMYK, YCbCr, LAB, HSV -> RGB by Pillow; LA, RGBA,
    PA and P with transparency drop the alpha channel, as `datasets.Image(mode="RGB")`
    and `transformers.image_utils.load_image` do, so inference sees images the
    way training saw them; 16- and 32-bit integer images (I;16*, I) are scaled
    from 0..65535 to 0..255 (Pillow's own conversion clips them to 255 instead);
    float images (F) are taken as 0..1 when their maximum is at most 1, else 0..255.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise SegdeployError(path, f"cannot read: {err.strerror or err}") from None
    if size == 0:
        raise SegdeployError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's warning at MAX_IMAGE_PIXELS.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise SegdeployError(
                        path,
                        f"image too large to decode safely: {w}x{h} = {w * h} pixels > "
                        f"{max_pixels} (raise --max-pixels if it is genuine)",
                    )
                im.load()
                image = im
    except SegdeployError:
        raise
    except UnidentifiedImageError:
        raise SegdeployError(path, "not an image (Pillow cannot identify the format)") from None
    except Image.DecompressionBombError as err:
        raise SegdeployError(path, f"image too large to decode safely: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as err:
        # Pillow reports truncated/corrupt data as OSError, some plugins as SyntaxError.
        raise SegdeployError(path, f"corrupt or truncated image: {err}") from None
    # Broken EXIF: the pixels are fine, keep them as stored. Without an orientation to
    # apply, exif_transpose would only copy the pixels (0.1-0.4 ms for a 480x360 photo).
    with contextlib.suppress(Exception):
        if image.getexif().get(ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
    try:
        return to_rgb(image)
    except (ValueError, OSError) as err:
        raise SegdeployError(path, f"cannot convert mode {image.mode} to RGB: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of `image` (see `load_image` for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(image, dtype=np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L").convert(
            "RGB"
        )
    if mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiply first
        image = image.convert(mode[0:-1] + "A")
    return image.convert("RGB")


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
