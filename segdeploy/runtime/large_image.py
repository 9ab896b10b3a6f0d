"""Large images in and out a band of rows at a time, for tiled inference (segdeploy.runtime.tiles).

In: a TIFF or BigTIFF, striped or tiled, is read by window through tifffile (the
`tiles` extra): only the strips or tiles a band of rows needs are read and
decoded, uncompressed ones straight from the file's bytes. Other formats (PNG,
JPEG...) and TIFF layouts the window reader does not take (palette, YCbCr, an
EXIF rotation) are decoded whole by Pillow, as `segdeploy infer` always does.

The decompression-bomb guard applies to what is decoded at once: the whole
image for Pillow's formats, one compressed strip or tile for the window reader
(--max-pixels). A TIFF whose declared size does not match its data (too few
strips, data past the end of the file, a strip that decodes to another size)
is an error naming the file.

Out: label maps up to LARGE_PIXELS are PNG, as without tiling; larger ones (or
any whose input is a GeoTIFF) are tiled TIFF written as the bands come, with the
input's georeferencing (GeoTIFF tags) and resolution carried over, so a GIS
places the labels on the image.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.atomic import atomic_path
from segdeploy.errors import SegdeployError
from segdeploy.runtime.image_io import MAX_PIXELS, image_size, load_image
from segdeploy.runtime.provenance import Mark, mark_tiff, tiff_placeholder

log = logging.getLogger(__name__)

TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
#: Label maps with more pixels than this (8192 x 8192) are written as tiled TIFF: a PNG
#: has to be assembled whole (64 MB of uint8 here), a tiled TIFF is written band by band.
LARGE_PIXELS = 1 << 26
#: Tile side of the TIFFs written (GDAL's and most viewers' default).
TIFF_TILE = 256
#: Tags of an input TIFF carried over to its label map: its place on the Earth (GeoTIFF).
GEO_TAGS = {
    33550: "ModelPixelScaleTag",
    33922: "ModelTiepointTag",
    34264: "ModelTransformationTag",
    34735: "GeoKeyDirectoryTag",
    34736: "GeoDoubleParamsTag",
    34737: "GeoAsciiParamsTag",
}
_RESOLUTION_TAGS = (282, 283, 296)  # XResolution, YResolution, ResolutionUnit
_ORIENTATION = 274
#: TIFF photometric interpretations the window reader converts to RGB.
_MINISBLACK, _RGB = 1, 2


def is_tiff(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in TIFF_SUFFIXES


def to_rgb_samples(samples: np.ndarray) -> np.ndarray:
    """h x w x s samples (uint8 or uint16; 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) as h x w
    x 3 uint8, by segdeploy.runtime.image_io's rules: alpha dropped, 16 bits scaled by 257."""
    if samples.dtype == np.uint16:
        samples = np.rint(samples / 257.0).astype(np.uint8)
    if samples.shape[-1] in (1, 2):
        return np.repeat(samples[..., :1], 3, axis=-1)
    return np.ascontiguousarray(samples[..., :3])


class _Closing:
    """`with source:` closes it."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArraySource(_Closing):
    """An image already in memory (h x w x 3 uint8), as a source of bands."""

    tags: dict[int, Any] = {}

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels
        self.height, self.width = pixels.shape[:2]

    def rows(self, y0: int, y1: int) -> np.ndarray:
        return self.pixels[y0:y1]

    def close(self) -> None:
        self.pixels = None


class TiffSource(_Closing):
    """A TIFF read a band of rows at a time (see the module docstring). `rows` gives RGB
    uint8, `samples` the stored samples (a label map's ids)."""

    def __init__(self, path: Path, tf, page, max_pixels: int | None):
        self.path, self._tf, self._page = path, tf, page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.planar = page.planarconfig == 2 and page.samplesperpixel > 1
        self.samples_per_pixel = int(page.samplesperpixel)
        self.dtype = np.dtype(page.dtype).newbyteorder(tf.byteorder)
        self.seg_h = min(int(page.tilelength if page.is_tiled else page.rowsperstrip), self.height)
        self.seg_w = int(page.tilewidth) if page.is_tiled else self.width
        self.raw = page.compression == 1 and page.fillorder == 1
        self.tags = {
            code: page.tags[code] for code in (*GEO_TAGS, *_RESOLUTION_TAGS) if code in page.tags
        }
        self._fd = tf.filehandle.fileno() if hasattr(tf.filehandle, "fileno") else None
        self._decoded: dict[int, np.ndarray] = {}
        self._check(max_pixels)

    @classmethod
    def open(
        cls, path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS
    ) -> TiffSource | None:
        """The window reader for `path`, or None for a TIFF layout it does not read (the
        caller decodes it whole). SegdeployError for a file that is not a readable TIFF."""
        import tifffile

        path = Path(path)
        try:
            tf = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError, ValueError, EOFError, struct.error) as err:
            raise SegdeployError(path, f"not a readable TIFF: {err}") from None
        try:
            page = tf.pages.first
            if not _window_readable(page):
                tf.close()
                return None
            return cls(path, tf, page, max_pixels)
        except BaseException:
            tf.close()
            raise

    def _check(self, max_pixels: int | None) -> None:
        """The declared size against the data: strip/tile count, data inside the file,
        and (compressed) what one strip or tile would decode to."""
        page, path = self._page, self.path
        grid = self._grid()
        needed = grid[0] * grid[1] * (self.samples_per_pixel if self.planar else 1)
        offsets, counts = page.dataoffsets, page.databytecounts
        kind = "tiles" if page.is_tiled else "strips"
        if len(offsets) != needed or len(counts) != needed:
            raise SegdeployError(
                path,
                f"declares {self.width}x{self.height} pixels in {needed} {kind} but lists "
                f"{len(offsets)}: its header does not match its data",
            )
        size = os.path.getsize(path)
        ends = np.asarray(offsets, np.int64) + np.asarray(counts, np.int64)
        if ends.size and int(ends.max()) > size:
            raise SegdeployError(
                path,
                f"declares {self.width}x{self.height} pixels but its data runs past the end of "
                f"the file ({int(ends.max())} > {size} bytes): truncated or corrupt",
            )
        if not self.raw and max_pixels is not None and self.seg_h * self.seg_w > max_pixels:
            raise SegdeployError(
                path,
                f"one compressed {kind[:-1]} holds {self.seg_w}x{self.seg_h} = "
                f"{self.seg_w * self.seg_h} pixels, decoded at once > {max_pixels} (raise "
                "--max-pixels if it is genuine)",
            )

    def _grid(self) -> tuple[int, int]:
        return math.ceil(self.height / self.seg_h), math.ceil(self.width / self.seg_w)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        return to_rgb_samples(self.samples(y0, y1))

    def samples(self, y0: int, y1: int) -> np.ndarray:
        """Rows y0..y1 as stored: [rows, width, samples], native byte order."""
        spp = self.samples_per_pixel
        out = np.empty((y1 - y0, self.width, spp), self.dtype.newbyteorder("="))
        nrows, ncols = self._grid()
        decoded: dict[int, np.ndarray] = {}
        for plane in range(spp if self.planar else 1):
            for r in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
                top = r * self.seg_h
                a, b = max(y0, top), min(y1, top + self.seg_h)
                for c in range(ncols):
                    index = (plane * nrows + r) * ncols + c
                    left = c * self.seg_w
                    w = min(self.seg_w, self.width - left)
                    if self.raw:
                        part = self._raw_rows(index, a - top, b - top)
                    else:
                        seg = self._decoded.get(index)
                        seg = seg if seg is not None else self._decode(index, r)
                        decoded[index] = seg
                        part = seg[a - top : b - top]
                    channels = slice(plane, plane + 1) if self.planar else slice(None)
                    out[a - y0 : b - y0, left : left + w, channels] = part[:, :w]
        self._decoded = decoded  # the next band overlaps this one: keep what it may reuse
        return out

    def _segment_shape(self) -> tuple[int, int]:
        return self.seg_w, (1 if self.planar else self.samples_per_pixel)

    def _read(self, offset: int, count: int) -> bytes:
        if self._fd is not None:
            data = os.pread(self._fd, count, offset)
        else:  # a file object without a descriptor
            fh = self._tf.filehandle
            fh.seek(offset)
            data = fh.read(count)
        if len(data) != count:
            raise SegdeployError(self.path, "truncated: its data ends before the header says")
        return data

    def _raw_rows(self, index: int, a: int, b: int) -> np.ndarray:
        """Rows a..b of uncompressed strip/tile `index`, read straight from the file."""
        width, spp = self._segment_shape()
        row_bytes = width * spp * self.dtype.itemsize
        if b * row_bytes > int(self._page.databytecounts[index]):
            raise SegdeployError(
                self.path,
                f"strip/tile {index} holds {int(self._page.databytecounts[index])} bytes, fewer "
                f"than its {b} rows of {width} pixels: the declared size does not match the data",
            )
        data = self._read(int(self._page.dataoffsets[index]) + a * row_bytes, (b - a) * row_bytes)
        rows = np.frombuffer(data, self.dtype).reshape(b - a, width, spp)
        return rows.astype(self.dtype.newbyteorder("="), copy=False)

    def _decode(self, index: int, row: int) -> np.ndarray:
        """Compressed strip/tile `index`, decoded: [rows, width, samples]."""
        page = self._page
        count = int(page.databytecounts[index])
        data = self._read(int(page.dataoffsets[index]), count) if count else None
        try:
            seg, _, _ = page.decode(
                data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader
            )
        except Exception as err:  # zlib, imagecodecs, tifffile: corrupt or truncated data
            raise SegdeployError(
                self.path, f"cannot decode strip/tile {index}: {type(err).__name__}: {err}"
            ) from None
        width, spp = self._segment_shape()
        rows = min(self.seg_h, self.height - row * self.seg_h)
        if seg is None or seg.ndim != 4 or seg.shape[2:] != (width, spp) or seg.shape[1] < rows:
            shape = None if seg is None else list(seg.shape[1:])
            raise SegdeployError(
                self.path,
                f"strip/tile {index} decodes to {shape}, not the {[rows, width, spp]} its "
                "header declares: the declared size does not match the data",
            )
        return seg[0].astype(self.dtype.newbyteorder("="), copy=False)

    def close(self) -> None:
        self._decoded = {}
        self._tf.close()


def _window_readable(page) -> bool:
    """Whether the window reader takes this page (else Pillow decodes the file whole)."""
    spp = int(page.samplesperpixel)
    photometric = int(page.photometric)
    ok_samples = (photometric == _MINISBLACK and spp in (1, 2)) or (
        photometric == _RGB and spp in (3, 4)
    )
    orientation = page.tags.get(_ORIENTATION)
    return (
        ok_samples
        and page.imagedepth == 1
        and np.dtype(page.dtype) in (np.dtype(np.uint8), np.dtype(np.uint16))
        and int(page.bitspersample) in (8, 16)
        and (orientation is None or orientation.value == 1)
        and page.imagelength > 0
        and page.imagewidth > 0
    )


@contextlib.contextmanager
def open_source(
    image, *, max_pixels: int | None = MAX_PIXELS, load: Callable | None = None
) -> Iterator[Any]:
    """A source of RGB bands (`height`, `width`, `rows(y0, y1)`, `tags`) for a path, a PIL
    image or an H x W x 3 uint8 array. TIFF paths are read by window when tifffile is
    installed (`pip install 'segdeploy[tiles]'`); `load` decodes anything else whole
    (default: image_io.load_image with `max_pixels`)."""
    source = None
    if isinstance(image, str | os.PathLike) and is_tiff(image):
        source = _tiff_source(Path(image), max_pixels)
    if source is None:
        load = load or (lambda im: load_image(im, max_pixels=max_pixels))
        source = ArraySource(np.asarray(load(image)))
    try:
        yield source
    finally:
        source.close()


def _tiff_source(path: Path, max_pixels: int | None, warn: bool = True) -> TiffSource | None:
    try:
        import tifffile  # noqa: F401
    except ImportError:
        if warn:
            log.warning(
                "%s: decoding the whole TIFF; pip install 'segdeploy[tiles]' to read it by window",
                path,
            )
        return None
    if not path.is_file():
        raise SegdeployError(path, "no such file")
    return TiffSource.open(path, max_pixels)


def peek(path: str | os.PathLike) -> tuple[int, int, dict] | None:
    """(height, width, carried tags) of the image at `path` as `open_source` will see it,
    from its header alone (what a run plans its outputs by); None when it cannot be read
    (segmenting it will fail, and say why)."""
    path = Path(path)
    if is_tiff(path):
        try:
            source = _tiff_source(path, None, warn=False)
        except SegdeployError:
            return None
        if source is not None:
            with source:
                return source.height, source.width, source.tags
    size = image_size(path)
    return None if size is None else (size[0], size[1], {})


# -- outputs ---------------------------------------------------------------------------


def wants_tiff(height: int, width: int, tags: dict) -> bool:
    """Whether a label map of this size (for an input with these carried `tags`) is written
    as a tiled TIFF: above LARGE_PIXELS, or when the input is georeferenced."""
    return height * width > LARGE_PIXELS or any(code in GEO_TAGS for code in tags)


def tiff_name(png: Path) -> Path:
    """The TIFF beside a planned PNG output: x.png -> x.tif (x_overlay.jpg -> x_overlay.tif)."""
    return png.with_suffix(".tif")


def write_tiff(
    path: str | os.PathLike,
    bands: Iterator[tuple[int, np.ndarray]],
    shape: tuple[int, ...],
    dtype,
    tags: dict | None = None,
    mark: Mark | None = None,
) -> None:
    """Write `bands` ((first row, rows) top to bottom, covering `shape` = (height, width)
    or (height, width, 3)) as a tiled, zlib-compressed TIFF (BigTIFF past 4 GB), atomically,
    with `tags` (TiffSource.tags of the input) carried over and the provenance `mark`
    (segdeploy.runtime.provenance) when given. Only one row of tiles is held."""
    import tifffile

    tags = tags or {}
    extratags = [
        (code, t.dtype, t.count, t.value, True) for code, t in tags.items() if code in GEO_TAGS
    ]
    resolution = {}
    if 282 in tags and 283 in tags:
        resolution["resolution"] = (tags[282].value, tags[283].value)
        if 296 in tags:
            resolution["resolutionunit"] = tags[296].value
    if mark is not None:
        extratags.append(tiff_placeholder(mark))
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=nbytes > 2**32 - 2**25) as tif:
            tif.write(
                _tiles(bands, shape, np.dtype(dtype)),
                shape=shape,
                dtype=dtype,
                tile=(TIFF_TILE, TIFF_TILE),
                compression="zlib",
                compressionargs={"level": 1},
                photometric="rgb" if len(shape) == 3 else "minisblack",
                extratags=extratags,
                metadata=None,
                **resolution,
            )
        if mark is not None:
            mark_tiff(tmp, mark)


def _tiles(bands, shape, dtype) -> Iterator[np.ndarray]:
    """The tiles of `bands`, row of tiles by row of tiles, left to right (tifffile's order),
    each padded to TIFF_TILE x TIFF_TILE."""
    height, width = shape[:2]
    row = np.zeros((TIFF_TILE, width, *shape[2:]), dtype)
    filled, top = 0, 0
    for y0, band in bands:
        if y0 != top + filled:
            raise ValueError(f"bands out of order: row {y0} after {top + filled}")
        at = 0
        while at < len(band):
            take = min(len(band) - at, TIFF_TILE - filled)
            row[filled : filled + take] = band[at : at + take]
            filled, at = filled + take, at + take
            if filled == TIFF_TILE or top + filled == height:
                yield from _row_tiles(row, filled)
                top, filled = top + filled, 0
    if top != height:
        raise ValueError(f"the bands end at row {top}, not {height}")


def _row_tiles(row: np.ndarray, filled: int) -> Iterator[np.ndarray]:
    row[filled:] = 0
    for x in range(0, row.shape[1], TIFF_TILE):
        tile = row[:, x : x + TIFF_TILE]
        if tile.shape[1] < TIFF_TILE:
            pad = np.zeros((TIFF_TILE, TIFF_TILE, *row.shape[2:]), row.dtype)
            pad[:, : tile.shape[1]] = tile
            tile = pad
        yield np.ascontiguousarray(tile)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """A label map segdeploy wrote (PNG or TIFF), as a 2-D array."""
    path = Path(path)
    if is_tiff(path):
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)
