"""Decode an image file safely into an upright 8-bit RGB Pillow image.

Every failure (empty file, not an image, truncated data, decompression bomb,
unsupported mode, a folder, FIFO or device, a file that cannot be read) becomes a `SegdeployError(path, reason)`, which `segdeploy
infer` records as a per-file failure and moves on.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

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


class ImageTooLarge(SegdeployError):
    """An image over the pixel limit (decompression-bomb guard): a front end answering
    requests tells it apart from a broken file (HTTP 413, not 400)."""


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
    _check_readable_file(path)
    return _decode(path, path, max_pixels)


def decode_image(
    data: bytes, *, where: str = "image", max_pixels: int | None = MAX_PIXELS
) -> Image.Image:
    """`load_image` for a file's bytes already in memory (an upload to `segdeploy serve`):
    the same checks, orientation and RGB conversion, so the same file gives the same
    pixels either way. `where` names the input in errors."""
    if not data:
        raise SegdeployError(where, "empty file (0 bytes)")
    return _decode(io.BytesIO(data), where, max_pixels)


def _decode(source: Path | BinaryIO, where, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's warning at MAX_IMAGE_PIXELS.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_within(source, max_pixels) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageTooLarge(
                        where,
                        f"image too large to decode safely: {w}x{h} = {w * h} pixels > "
                        f"{max_pixels} (raise --max-pixels if it is genuine)",
                    )
                if w == 0 or h == 0:
                    raise SegdeployError(where, f"empty image ({w}x{h} pixels)")
                im.load()
                image = im
    except SegdeployError:
        raise
    except UnidentifiedImageError:
        raise SegdeployError(where, "not an image (Pillow cannot identify the format)") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(where, f"image too large to decode safely: {err}") from None
    except OSError as err:
        if err.errno is not None:  # the OS refused (permissions, I/O error), not the data
            raise SegdeployError(where, f"cannot read: {err.strerror or err}") from None
        raise SegdeployError(where, f"corrupt or truncated image: {err}") from None
    except (SyntaxError, ValueError, EOFError, IndexError, MemoryError) as err:
        # Pillow reports truncated/corrupt data as OSError, some plugins as SyntaxError.
        raise SegdeployError(where, f"corrupt or truncated image: {err}") from None
    # Broken EXIF: the pixels are fine, keep them as stored. Without an orientation to
    # apply, exif_transpose would only copy the pixels (0.1-0.4 ms for a 480x360 photo).
    with contextlib.suppress(Exception):
        if image.getexif().get(ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
    try:
        return to_rgb(image)
    except (ValueError, OSError) as err:
        raise SegdeployError(where, f"cannot convert mode {image.mode} to RGB: {err}") from None


def _check_readable_file(path: Path) -> None:
    """SegdeployError unless `path` is a non-empty regular file (through symlinks), with
    the reason: a folder, a FIFO or a device (whose size 0 says nothing), a dangling link."""
    try:
        st = path.stat()
    except OSError as err:
        if path.is_symlink():
            raise SegdeployError(path, "dangling symlink (its target does not exist)") from None
        raise SegdeployError(path, f"cannot read: {err.strerror or err}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SegdeployError(path, "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise SegdeployError(path, f"not a regular file ({file_kind(st.st_mode)}), not an image")
    if st.st_size == 0:
        raise SegdeployError(path, "empty file (0 bytes)")


def file_kind(mode: int) -> str:
    """What a file that is neither a regular file nor a folder is, in words."""
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) of the image at `path` as `load_image` would return it (EXIF
    orientation applied), from its header alone; None when it cannot be read."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(ORIENTATION, 1) in _TRANSPOSING:
                w, h = h, w
    except Exception:  # any failure: the caller redoes the image, and that says why
        return None
    return h, w


#: EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_TRANSPOSING = frozenset({5, 6, 7, 8})


def array_image(array: np.ndarray) -> Image.Image:
    """An RGB image from a uint8 array: HxW or HxWx1 (grey), HxWx3 (RGB), HxWx4 (RGBA, the
    alpha dropped as for files); anything else is a SegdeployError saying what to pass."""
    shape = array.shape
    if array.dtype != np.uint8:
        raise SegdeployError(None, f"arrays must be uint8, got {array.dtype} {shape}")
    channels_last = array.ndim == 3 and shape[2] in (1, 3, 4)
    if array.ndim == 3 and not channels_last and shape[0] in (1, 3, 4):
        raise SegdeployError(
            None,
            f"array of shape {shape} looks channels-first (CxHxW); pass HxWxC, e.g. "
            "array.transpose(1, 2, 0)",
        )
    if not (array.ndim == 2 or channels_last):
        raise SegdeployError(
            None,
            f"arrays must be HxW (grey), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA), got shape {shape}",
        )
    if shape[0] == 0 or shape[1] == 0:
        raise SegdeployError(None, f"empty image ({shape[1]}x{shape[0]} pixels)")
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


#: Serialises the moments when Pillow's process-wide limit is raised (see _open_within).
_PILLOW_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _open_within(source: Path | BinaryIO, max_pixels: int | None) -> Iterator[Image.Image]:
    """Image.open, with Pillow's own bomb check no stricter than `max_pixels`.

    Pillow refuses images above 2 x Image.MAX_IMAGE_PIXELS inside Image.open,
    and offers no per-call limit, only that module global. So when the caller
    allows more (--max-pixels above ~179 MP, or None), the global is raised for
    the header read only, under a lock, and put back at once: no lasting change
    that other Pillow users in the process would inherit. Our own check on the
    header size (load_image) is then the one that applies. The common case
    (max_pixels within Pillow's limit) takes no lock.
    """
    pillow = Image.MAX_IMAGE_PIXELS
    if pillow is None or (max_pixels is not None and max_pixels <= 2 * pillow):
        with Image.open(source) as im:
            yield im
        return
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            im = Image.open(source)  # reads the header only: the bomb check happens here
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with im:
        yield im


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


# -- label maps ------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def label_png(labels: np.ndarray) -> bytes:
    """A 2-D uint8 or uint16 array of class ids as a greyscale PNG file (8- or 16-bit).

    Written with zlib rather than Pillow: Pillow tries all five PNG row filters
    on every row of a greyscale image and has no option to choose one, which was
    3/4 of its encode time on label maps (1.0-1.7 ms for 480x360). Label maps
    need no filter: runs of one id compress best with zlib's run-length strategy
    (Z_RLE), at level 1. Measured on CamVid-sized maps: 3x faster than Pillow at
    compress_level=1, and smaller. The PNG container is three chunks (IHDR, IDAT,
    IEND) of the PNG specification; Pillow and every PNG reader decode the same
    array, mode L (or I;16), as from Pillow's own files.
    """
    if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"label map must be 2-D uint8 or uint16, got {labels.dtype} {labels.shape}"
        )
    h, w = labels.shape
    rows = np.zeros((h, 1 + w * labels.itemsize), np.uint8)  # filter byte 0 (None) per row
    rows[:, 1:] = labels.astype(labels.dtype.newbyteorder(">"), copy=False).view(np.uint8)
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    data = deflate.compress(rows) + deflate.flush()
    header = struct.pack(">IIBBBBB", w, h, 8 * labels.itemsize, 0, 0, 0, 0)  # greyscale
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", data),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
