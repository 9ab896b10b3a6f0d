"""Helpers of the `segdeploy serve` tests: photos, free ports, Ray's processes."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from segdeploy.data.synthetic import synthetic_sample

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def photo_bytes(kind: str, i: int = 0, size=(48, 64)) -> bytes:
    """A synthetic scene encoded as `kind`: jpeg, png, rgba (PNG), grey (PNG), exif (a JPEG
    stored on its side, with EXIF orientation 6 to turn it upright)."""
    rgb = synthetic_sample(i, seed=5, size=size)[0]
    image = Image.fromarray(rgb)
    buf = io.BytesIO()
    if kind == "jpeg":
        image.save(buf, "JPEG", quality=90)
    elif kind == "png":
        image.save(buf, "PNG")
    elif kind == "rgba":
        alpha = np.full(rgb.shape[:2], 200, np.uint8)
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(buf, "PNG")
    elif kind == "grey":
        image.convert("L").save(buf, "PNG")
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", exif=exif)
    else:
        raise ValueError(kind)
    return buf.getvalue()


SUFFIX = {"jpeg": ".jpg", "png": ".png", "rgba": ".png", "grey": ".png", "exif": ".jpg"}


def write_photos(folder: Path) -> list[Path]:
    """One photo of each kind above, of two sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, kind in enumerate(SUFFIX):
        path = folder / f"{kind}{SUFFIX[kind]}"
        path.write_bytes(photo_bytes(kind, i, size=(48, 64) if i % 2 else (61, 37)))
        paths.append(path)
    return paths


def processes_under(marker: str) -> list[str]:
    """Command lines of live processes that name `marker` (a Ray temp folder)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(cmd)
    return found


def environments_of(name: str) -> list[dict[str, str]]:
    """The environments of live processes whose command line names `name`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if name.encode() not in (proc / "cmdline").read_bytes():
                continue
            pairs = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        found.append(dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p))
    return found


def wait_gone(marker: str, timeout_s: float = 20.0) -> list[str]:
    """Processes naming `marker` still alive after up to `timeout_s` (none, hopefully)."""
    deadline = time.monotonic() + timeout_s
    while processes_under(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return processes_under(marker)


@contextlib.contextmanager
def ray_environment() -> Iterator[str]:
    """A short private RAY_TMPDIR (Ray's socket paths must stay under 108 bytes) and this
    checkout first on PYTHONPATH (Ray's workers inherit it); yields the folder, whose name
    every Ray process of the block carries in its command line."""
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "PYTHONPATH")}
    folder = tempfile.mkdtemp(prefix="sdray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = folder
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    try:
        yield folder
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def without_mark(png: bytes) -> bytes:
    """A label PNG `segdeploy infer` wrote, less its provenance mark (the tEXt chunk
    keyed `segdeploy` after IHDR, segdeploy.runtime.provenance): the bytes of the label
    map itself, which a service answer carries with no file path to mark."""
    out, at = bytearray(png[:8]), 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        chunk = png[at : at + 12 + length]
        if not (chunk[4:8] == b"tEXt" and chunk[8:].startswith(b"segdeploy\0")):
            out += chunk
        at += 12 + length
    return bytes(out)
