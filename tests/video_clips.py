"""Clips the tests make themselves with PyAV: synthetic scenes, any codec, rotation tags,
variable frame rates; and the frames a plain PyAV decode gives, to compare against."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")


def scenes(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """`n` RGB frames (H x W x 3 uint8) of moving synthetic shapes."""
    from segdeploy.data.synthetic import synthetic_sample

    return [synthetic_sample(seed + i, size=size)[0] for i in range(n)]


def write_clip(
    path: Path,
    frames: list[np.ndarray],
    *,
    codec: str = "libx264",
    pixel_format: str = "yuv420p",
    rate: int = 10,
    rotation: int | None = None,
    times: list[float] | None = None,
    options: dict | None = None,
) -> Path:
    """Encode `frames` (RGB) into `path`; `times` (seconds) gives a variable frame rate."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, pixel_format
        if options:
            s.options = options
        if times is not None:
            s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
            if times is not None:
                f.pts, f.time_base = int(round(times[i] * 1000)), Fraction(1, 1000)
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    return path


def decoded_frames(path: Path) -> list[np.ndarray]:
    """What plain PyAV decodes (RGB24 by libswscale), rotation not applied."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def label_stream(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray() for f in c.decode(video=0)]
