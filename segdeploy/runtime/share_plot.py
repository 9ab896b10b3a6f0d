"""A clip's `classes.png`: its class shares over time, stacked, drawn with Pillow.

Drawn by hand, not with matplotlib (which draws segdeploy's training curves and
the bench charts), for what matplotlib costs a run: about 1 s of CPU for its
import, its first figure and this chart on the 2-core AVX2 EPYC, paid by every
run with a clip whatever its length. With a cheap model that set a short clip's
rate (docs/video.md has the measurements). The chart is one polygon per class,
two labelled axes and a legend: Pillow, which the run has loaded already, draws
it in milliseconds, in the run's own process, once the clip's shares are
complete.

What is drawn is small: the shares binned over time (`share_series`, at most
`BINS` rows however long the clip), computed from the clip's journal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segdeploy.atomic import atomic_path
from segdeploy.errors import first_line

#: Time bins of a plot: a long clip plots the mean share per bin, in constant memory.
BINS = 600
#: The chart's size in pixels.
SIZE = (800, 350)
#: A class name longer than this is cut in the legend (ADE20K's run to 50 characters).
LEGEND_CHARS = 28
#: Drawn this many times larger, then reduced: Pillow does not antialias polygons or
#: lines; the reduction does.
FINE = 2


@dataclass(frozen=True)
class ShareSeries:
    """What one clip's plot shows: per time bin with frames, the mean share of each class
    present anywhere in the clip."""

    centres: np.ndarray  # seconds, one per bin: the mean time of its frames
    means: np.ndarray  # (bins, classes present)
    labels: list[str]  # the classes present, in id order
    colours: np.ndarray  # (classes present, 3), 0-1: the overlay's palette
    title: str


def share_series(
    journal: Path, id2label: dict[int, str], title: str, bins: int = BINS
) -> ShareSeries | None:
    """The binned shares of the frames in a clip's journal (None: no frame)."""
    from segdeploy.runtime.palette import palette_for

    times, rows = [], []
    with journal.open(encoding="utf-8") as f:
        next(f, None)  # the run header
        for line in f:
            x = json.loads(line)
            times.append(x["time"])
            rows.append(x["shares"])
    if not times:
        return None
    n = len(id2label)
    edges = np.linspace(times[0], times[-1] + 1e-9, min(bins, len(times)) + 1)
    which = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 2)
    sums = np.zeros((len(edges) - 1, n))
    hits = np.bincount(which, minlength=len(edges) - 1).astype(np.float64)
    for b, shares in zip(which, rows, strict=True):
        for k, v in shares.items():
            sums[b, int(k)] += v
    keep = hits > 0
    mean = sums[keep] / hits[keep, None]
    present = [i for i in range(n) if mean[:, i].any()]
    return ShareSeries(
        centres=np.bincount(which, weights=times, minlength=len(hits))[keep] / hits[keep],
        means=mean[:, present],
        labels=[id2label.get(i, str(i)) for i in present],
        colours=palette_for(n)[present] / 255.0,
        title=title,
    )


def draw_shares(series: ShareSeries, dest: Path) -> str | None:
    """The stacked shares as a PNG at `dest`, written atomically; None, or why it could
    not be written (one line: the clip's summary.json says it instead of naming a plot)."""
    try:
        with atomic_path(dest) as tmp:
            chart(series).save(tmp, format="PNG")
    except Exception as err:  # the name taken by a folder, a full disk, a bug here: the
        # clip's labels are written, so the run goes on and its summary says why
        return f"cannot draw the class-share plot: {type(err).__name__}: {first_line(err)}"
    return None


def chart(series: ShareSeries) -> Image.Image:
    """The chart at SIZE: the stack in a frame with time (s) below and share of pixels
    (0-1) on the left, the title above, the legend on the right."""
    w, h = SIZE[0] * FINE, SIZE[1] * FINE
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=11 * FINE)
    legend = _legend(series, top=30 * FINE, bottom=h - 10 * FINE)
    width = max((draw.textlength(text, font=font) for text, _ in legend), default=0)
    box = (62 * FINE, 30 * FINE, w - int(width) - 40 * FINE, h - 45 * FINE)
    image.paste(_stack(series, (box[2] - box[0], box[3] - box[1])), box[:2])
    _axes(draw, image, series, box, font)
    x = box[2] + 12 * FINE
    for row, (text, colour) in enumerate(legend):
        y = box[1] + row * 16 * FINE
        if colour is not None:
            draw.rectangle((x, y + 2 * FINE, x + 10 * FINE, y + 12 * FINE), fill=colour)
        draw.text((x + 15 * FINE, y), text, fill="black", font=font)
    return image.resize(SIZE, Image.Resampling.BOX)


def _stack(series: ShareSeries, size: tuple[int, int]) -> Image.Image:
    """The plot area: one polygon per class between the running sums below and above it,
    on an image of its own, so that no polygon's edge pixel lands outside the frame."""
    width, height = size
    stack = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(stack)
    c = series.centres
    span = c[-1] - c[0]
    xs = (c - c[0]) / span * width if span > 0 else np.array([0.0, width])
    means = series.means if span > 0 else np.repeat(series.means[:1], 2, axis=0)
    upper = np.cumsum(means, axis=1)
    lower = upper - means
    for k, colour in enumerate(_rgb(series.colours)):
        top = list(zip(xs, height - upper[:, k] * height, strict=True))
        floor = list(zip(xs[::-1], height - lower[::-1, k] * height, strict=True))
        draw.polygon([(float(x), float(y)) for x, y in top + floor], fill=colour)
    return stack


def _axes(draw, image: Image.Image, series: ShareSeries, box, font) -> None:
    """The frame, ticks every 0.25 of the shares and at round seconds, axis names, title."""
    left, top, right, bottom = box
    tick = 4 * FINE
    draw.rectangle(box, outline="black", width=FINE)
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - share * (bottom - top)
        draw.line((left - tick, y, left, y), fill="black", width=FINE)
        draw.text((left - tick - 2 * FINE, y), f"{share:g}", fill="black", font=font, anchor="rm")
    c0, c1 = float(series.centres[0]), float(series.centres[-1])
    span = c1 - c0
    for t, text in _time_ticks(c0, c1):
        x = left + (t - c0) / span * (right - left) if span > 0 else (left + right) / 2
        draw.line((x, bottom, x, bottom + tick), fill="black", width=FINE)
        draw.text((x, bottom + tick + FINE), text, fill="black", font=font, anchor="mt")
    middle = (left + right) / 2
    draw.text((middle, image.height - 4 * FINE), "time (s)", fill="black", font=font, anchor="md")
    draw.text((middle, top / 2), series.title, fill="black", font=font, anchor="mm")
    name = "share of pixels"
    label = Image.new("L", (int(draw.textlength(name, font=font)) + 2, 16 * FINE), 255)
    ImageDraw.Draw(label).text((1, 0), name, fill=0, font=font)
    label = label.rotate(90, expand=True)
    image.paste(
        "black", (4 * FINE, (top + bottom - label.height) // 2), label.point(lambda v: 255 - v)
    )


def _time_ticks(c0: float, c1: float, most: int = 8) -> list[tuple[float, str]]:
    """Ticks at a round step (1, 2 or 5 times a power of ten) between c0 and c1: at most
    `most`; one at c0 when c0 == c1."""
    span = c1 - c0
    if span <= 0:
        return [(c0, f"{c0:g}")]
    raw = span / most
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    decimals = max(0, -math.floor(math.log10(step)))
    first = math.ceil(c0 / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(c1 / step + 1e-9) + 1)]
    return [(t, f"{t:.{decimals}f}") for t in ticks]


def _legend(series: ShareSeries, top: int, bottom: int) -> list[tuple[str, tuple | None]]:
    """(text, colour) rows: every class present, in id order, or when they do not fit the
    chart's height the largest by mean share and a last row saying how many are left."""
    fit = max(1, (bottom - top) // (16 * FINE))
    names = [n if len(n) <= LEGEND_CHARS else n[: LEGEND_CHARS - 3] + "..." for n in series.labels]
    rows = list(zip(names, _rgb(series.colours), strict=True))
    if len(rows) <= fit:
        return rows
    order = np.argsort(-series.means.mean(axis=0), kind="stable")[: fit - 1]
    return [rows[i] for i in sorted(order)] + [(f"+ {len(rows) - fit + 1} more", None)]


def _rgb(colours: np.ndarray) -> list[tuple[int, int, int]]:
    return [tuple(int(round(v * 255)) for v in c) for c in colours]
