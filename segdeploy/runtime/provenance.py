"""Which files in an output folder segdeploy wrote: a mark inside each label map and overlay.

`segdeploy infer` replaces a file at one of its output paths only if it wrote
that file itself; anything else (a user's ground-truth mask in the folder
named as OUT, a file edited since) stops the run before work unless
`--overwrite`. The proof travels in the file, not in a list beside it: a run
killed by SIGKILL or the OOM killer leaves complete outputs but no
summary.json, and those must still be recognised (and skipped by
`--skip-existing`).

The mark is a small JSON text: the output's path relative to OUT, the model's
fingerprint, the label map's size, and the SHA-256 of the file's other bytes.
In a label PNG it is a `tEXt` chunk (keyword `segdeploy`) right after IHDR; in
an overlay JPEG a COM segment after SOI (and JFIF's APP0); in the TIFFs of a
tiled run (`--tile`: large or georeferenced images) a private ASCII tag
(TIFF_TAG) of the first page, its digest over every byte but the tag's value.
Every reader ignores all three, so the pixels read back as before. A file is ours only when its
mark is there, names the path it is found at, and the digest still matches
(a file edited since, or re-saved by another program, is not ours any more).

Hand-written: Pillow can write a PNG text chunk but not hash the file around
it, and its JPEG comment goes after the tables, where finding it means parsing
the whole header.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segdeploy.atomic import is_temporary_name

#: PNG tEXt keyword and JPEG COM prefix of the mark.
KEY = b"segdeploy"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = 8 + 8 + 13 + 4  # signature, IHDR's length and type, its 13 bytes, its CRC
#: Files larger than this are not read to check a mark (outputs are far smaller); a TIFF
#: is hashed from the disk a block at a time, whatever its size.
_MAX_MARKED_BYTES = 1 << 30
#: The private TIFF tag (the range TIFF 6.0 leaves to private use; tifffile, GDAL and
#: libtiff name none at this number) holding a TIFF output's mark, ASCII.
TIFF_TAG = 65117
_TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # TIFF and BigTIFF, both orders


@dataclass(frozen=True)
class Mark:
    """What a marked output says about itself."""

    path: str  # relative to OUT, with "/" separators
    model: str | None  # the model's fingerprint (Segmenter.fingerprint)
    size: tuple[int, int]  # (height, width) of the label map

    def _text(self, digest: str) -> bytes:
        fields = {"path": self.path, "model": self.model, "size": list(self.size), "sha256": digest}
        return json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def mark_png(png: bytes, mark: Mark) -> bytes:
    """`png` (a PNG file whose first chunk is IHDR) with the mark after IHDR."""
    head, tail = png[:_IHDR_END], png[_IHDR_END:]
    data = KEY + b"\0" + mark._text(_digest(head, tail))
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    return head + chunk + struct.pack(">I", zlib.crc32(b"tEXt" + data)) + tail


def mark_jpeg(jpeg: bytes, mark: Mark) -> bytes:
    """`jpeg` with the mark as a COM segment after SOI (and APP0, if the file has one)."""
    at = _jpeg_mark_offset(jpeg)
    head, tail = jpeg[:at], jpeg[at:]
    data = KEY + b" " + mark._text(_digest(head, tail))
    return head + b"\xff\xfe" + struct.pack(">H", len(data) + 2) + data + tail


def tiff_placeholder(mark: Mark) -> tuple:
    """The extra tag (tifffile's `extratags` form) that reserves room for `mark` in a TIFF
    being written; `mark_tiff` fills it in once the file is complete."""
    return (TIFF_TAG, "s", 0, mark._text("0" * 64).decode("ascii"), True)


def mark_tiff(path: str | os.PathLike, mark: Mark) -> None:
    """Write `mark` into the TIFF at `path` (written with `tiff_placeholder(mark)`), in place:
    the digest covers every byte of the file but the tag's value."""
    path = Path(path)
    placeholder, offset, count = _tiff_mark_place(path)
    if placeholder is None or len(placeholder) + 1 != count:
        raise ValueError(f"{path}: no room for the mark (written without tiff_placeholder?)")
    text = mark._text(_file_digest(path, offset, count))
    if len(text) + 1 != count:
        raise ValueError(f"{path}: the mark does not fit its placeholder")
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(text + b"\0")


def read_mark(path: str | os.PathLike) -> Mark | None:
    """The mark of the file at `path`, or None: no mark (not written by segdeploy), bytes
    changed since it was written, not a regular file, or unreadable."""
    path = Path(path)
    try:
        if not path.is_file() or path.is_symlink():
            return None
        with path.open("rb") as f:
            first = f.read(4096)
        if first[:4] in _TIFF_SIGNATURES:
            return _tiff_mark(path)
        if path.stat().st_size > _MAX_MARKED_BYTES:
            return None
        with path.open("rb") as f:
            first = f.read(4096)
            if not (first.startswith(_PNG_SIGNATURE) or first.startswith(b"\xff\xd8")):
                return None
            data = first + f.read()
    except OSError:
        return None
    try:
        found = _png_mark(data) if data.startswith(_PNG_SIGNATURE) else _jpeg_mark(data)
    except struct.error:  # too short to hold what its header announces
        return None
    if found is None:
        return None
    text, head, tail = found
    try:
        fields = json.loads(text)
        if fields["sha256"] != _digest(head, tail):
            return None
        return Mark(str(fields["path"]), fields["model"], tuple(fields["size"]))
    except (ValueError, KeyError, TypeError):
        return None


def owned(path: str | os.PathLike, rel: str) -> Mark | None:
    """The mark of `path` if segdeploy wrote it for the output path `rel` (relative to OUT)."""
    mark = read_mark(path)
    return mark if mark is not None and mark.path == rel else None


def occupant(path: str | os.PathLike, rel: str) -> str | None:
    """What is at the output path `path` (`rel` relative to OUT): None (nothing), "ours"
    (a file segdeploy wrote for `rel`, unchanged), "folder", or "other" (anything else:
    a user's file, a symlink, a FIFO, a file changed since, one that cannot be read)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (OUT not made yet)
        return None
    except OSError:
        return "other"
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    return "ours" if owned(path, rel) is not None else "other"


def foreign_files(
    folder: Path, skip: Callable[[Path], bool] | None = None
) -> tuple[Path | None, int]:
    """The first file under `folder` that segdeploy did not write, and how many there are.

    Walked without following links; a file is segdeploy's when it carries the mark of
    its own path, or is one of the tool's temporaries, or `skip` accepts it. A symlink
    (to a file or a folder) is never segdeploy's.
    """
    first, count = None, 0
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in (*files, *links):
            path = Path(root, name)
            if is_temporary_name(name) or (skip is not None and skip(path)):
                continue
            if owned(path, rel_name(path, folder)) is None:
                count += 1
                first = first or path
    return first, count


def rel_name(path: str | os.PathLike, output: str | os.PathLike) -> str:
    """`path` relative to `output`, with "/" separators: the path a mark records."""
    return Path(os.path.relpath(path, output)).as_posix()


def _tiff_mark_place(path: Path) -> tuple[str | None, int, int]:
    """(the mark tag's text or None, its value's offset in the file, its byte count)."""
    import tifffile  # the tiles extra: only tiled runs write TIFFs

    with tifffile.TiffFile(path) as tf:
        tag = tf.pages.first.tags.get(TIFF_TAG)
        if tag is None or not isinstance(tag.value, str):
            return None, 0, 0
        return tag.value, int(tag.valueoffset), int(tag.count)


def _tiff_mark(path: Path) -> Mark | None:
    try:
        text, offset, count = _tiff_mark_place(path)
    except Exception:  # tifffile missing, or not a TIFF it can parse: not ours
        return None
    if text is None:
        return None
    try:
        fields = json.loads(text)
        if fields["sha256"] != _file_digest(path, offset, count):
            return None
        return Mark(str(fields["path"]), fields["model"], tuple(fields["size"]))
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _file_digest(path: Path, skip_at: int, skip: int) -> str:
    """SHA-256 of the file's bytes but `skip` bytes at `skip_at`, read a block at a time."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for start, end in ((0, skip_at), (skip_at + skip, None)):
            f.seek(start)
            left = None if end is None else end - start
            while left is None or left > 0:
                block = f.read(1 << 20 if left is None else min(left, 1 << 20))
                if not block:
                    break
                h.update(block)
                left = None if left is None else left - len(block)
    return h.hexdigest()


def _digest(head: bytes, tail: bytes) -> str:
    h = hashlib.sha256(head)
    h.update(tail)
    return h.hexdigest()


def _png_mark(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    at = _IHDR_END
    if data[12:16] != b"IHDR" or len(data) < at + 12 or data[at + 4 : at + 8] != b"tEXt":
        return None
    (length,) = struct.unpack(">I", data[at : at + 4])
    body = data[at + 8 : at + 8 + length]
    if not body.startswith(KEY + b"\0"):
        return None
    return body[len(KEY) + 1 :], data[:at], data[at + 12 + length :]


def _jpeg_mark_offset(data: bytes) -> int:
    """Where the mark goes: after SOI, and after a JFIF APP0 segment right behind it."""
    if data[2:4] == b"\xff\xe0":
        return 4 + struct.unpack(">H", data[4:6])[0]
    return 2


def _jpeg_mark(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    at = _jpeg_mark_offset(data)
    if data[at : at + 2] != b"\xff\xfe":
        return None
    (length,) = struct.unpack(">H", data[at + 2 : at + 4])
    body = data[at + 4 : at + 2 + length]
    if not body.startswith(KEY + b" "):
        return None
    return body[len(KEY) + 1 :], data[:at], data[at + 2 + length :]
