"""Overlapping windows' logits into one label map, band by band: MMSegmentation's slide mode
(`mean`) or MONAI's gaussian importance weights (`gaussian`), exactly, in bounded memory.

MMSegmentation (`EncoderDecoder.slide_inference`) resizes each window's logits to
the window (bilinear, align_corners=False), adds them into a C x H x W buffer,
divides by how many windows cover each pixel and takes the argmax. Here no C x H
x W buffer exists. Each window's logits are kept at the model's own resolution
(SegFormer's are 1/4 of the window per side, 16x fewer values) for as long as a
pixel they cover is unfinished, and only the rows later bands still need are
kept once a band is done; the label map is produced band by band (the rows of
pixels that no later window touches), so memory follows a row of windows, not
the image.

Each pixel's label is found in one of two ways, both giving the reference's answer:

- Pure pixels. A pixel's resized logits, in one window, are a blend with weights
  >= 0 of the logit vectors at the four corners of its source cell. If one class
  k leads every other class at all four corners of its cell in every window that
  covers it, it leads the average of those blends (the mean and the gaussian
  weighting alike, weights being >= 0). Float rounding cannot undo a lead that
  is larger than the rounding errors: a corner counts only when k's lead is over
  SURE_MARGIN of the window's largest |logit|, far above them (see below). So
  such pixels get k without touching their C logits: that is most pixels,
  everything away from class borders.
- Bounded pixels. Near a border, k's lead over every other class at a pixel, in
  one window, is at least the blend of (k's logit - the best other logit) at its
  four corners: one class's values, not C. A window whose leader passes that
  bound vouches for it (`_Held._leading`); where the windows disagree, the
  weighted mean of their bounds for one leader, over the margin, proves it
  (`TileBlender._leaders`): k's lead in the average is at least that mean.
- The others are computed in full: for each covering window
  in MMSegmentation's order (row by row, left to right) the same float32
  operations as torch's CPU kernel for `F.interpolate(mode="bilinear")`, which
  fuses a multiply-add at two places (measured bit for bit: see
  `_fma`), summed into float32, divided by the float32 count (MMSeg's count_mat)
  or the summed weights (MONAI's count_map), then argmax (first maximum).

Why the margin suffices: every value is a sum of at most (windows covering it)
x 4 products of logits with weights in [0, 1]; float32 rounding changes each
by at most ~2^-24 of its size, so a mean of n windows moves by at most about
(n + 6) * 2^-24 * max|logit|, and the division can merge values only closer
than that. SURE_MARGIN = 2^-12 is 4096 times the unit roundoff: the shortcut's
answer equals the full computation's for any n below ~1000 windows per pixel.

MMSegmentation's `inference` applies a softmax before the argmax; softmax keeps
the order of the classes, so it can only merge averages that are equal to
float32 precision into a tie. That is left out here (as it is of the issue's
rule: sum, count, argmax).

Hand-written because no library blends sliding windows without the C x H x W
buffer (MMSegmentation, MONAI and pytorch-toolbelt all allocate it).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from segdeploy.runtime.upsample import label_dtype, source_index

F32, F64 = np.float32, np.float64

#: A corner vouches for its class only when that class leads the second by more than
#: this share of the window's largest |logit| (see the module docstring).
SURE_MARGIN = 2.0**-12
#: Pixels blended at once where windows or classes meet (bounds the temporaries).
BLOCK_PIXELS = 1 << 14
#: Classes ranked per source pixel: the candidates tried before every class
#: (TileBlender._exact). 3 left 7,010 pixels to every class instead of 30,119 in the
#: 2048^2 replay (150 classes, random weights) but ranking one class more costs every
#: window: in-process interleaved pairs against 2, mean blend 0.96x, gaussian 1.11x,
#: a trained 11-class model's mean blend 1.04x the CPU.
RANKS = 2
#: Pixels ranked at once (ranked): 150 classes of 8192 pixels are 4.9 MB, measured
#: 1.3x faster than a whole 128 x 128 window's logits (2-core AVX2 EPYC).
RANK_PIXELS = 8192
#: Columns finished at once: bounds the int32 work arrays of a band.
REGION_COLUMNS = 2048


@dataclass(frozen=True)
class Window:
    """One window of the grid: rows y1..y2, columns x1..x2 (ends excluded) of the image."""

    row: int
    col: int
    y1: int
    y2: int
    x1: int
    x2: int

    @property
    def size(self) -> tuple[int, int]:
        return self.y2 - self.y1, self.x2 - self.x1


@dataclass(frozen=True)
class Grid:
    """MMSegmentation's window placement over an image of `height` x `width`."""

    height: int
    width: int
    tile: tuple[int, int]
    ys: tuple[int, ...]  # y1 of each window row, increasing
    xs: tuple[int, ...]  # x1 of each window column, increasing

    @classmethod
    def over(cls, height: int, width: int, tile, stride) -> Grid:
        (th, tw), (sh, sw) = tile, stride
        return cls(height, width, (th, tw), _starts(height, th, sh), _starts(width, tw, sw))

    def window(self, row: int, col: int) -> Window:
        y1, x1 = self.ys[row], self.xs[col]
        y2, x2 = min(y1 + self.tile[0], self.height), min(x1 + self.tile[1], self.width)
        return Window(row, col, y1, y2, x1, x2)

    def windows(self) -> Iterator[Window]:
        """Every window, row by row, left to right: MMSegmentation's order."""
        for row in range(len(self.ys)):
            for col in range(len(self.xs)):
                yield self.window(row, col)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def band_end(self, row: int) -> int:
        """The end of band `row`: rows ys[row]..band_end are covered by no later window row."""
        return self.ys[row + 1] if row + 1 < len(self.ys) else self.height


def _starts(n: int, crop: int, stride: int) -> tuple[int, ...]:
    """Window starts along one axis, as slide_inference computes them: h_grids = max(n -
    crop + stride - 1, 0) // stride + 1 windows every `stride`, the last one shifted back
    to end at the border (y1 = max(y2 - crop, 0)); one window of the whole side when n <
    crop."""
    count = max(n - crop + stride - 1, 0) // stride + 1
    return tuple(max(min(i * stride + crop, n) - crop, 0) for i in range(count))


@functools.lru_cache(maxsize=64)
def _axis(in_size: int, out_size: int, keep: int) -> tuple[np.ndarray, ...]:
    """(i0, i1, w0, w1) of torch's bilinear resize from `in_size` to `out_size`
    (align_corners=False), for the first `keep` outputs (a padded window keeps its image
    part). Read-only: shared by every window of the same shape."""
    arrays = tuple(a[:keep].copy() for a in source_index(in_size, out_size))
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c rounded once, as the fused multiply-add torch's compiled kernel
    uses. The product of two float32 is exact in float64; one rounding to float64, then
    one to float32 (numpy has no float32 fma)."""
    return (a.astype(F64) * b.astype(F64) + c.astype(F64)).astype(F32)


def _bilinear(a, b, c, d, wx0, wx1, wy0, wy1) -> np.ndarray:
    """Plain float32 blend of values at a cell's four corners (top-left, top-right,
    bottom-left, bottom-right) along x then y: the bounds' arithmetic (lead bounds, the
    bound on classes not ranked), one place so that every bound rounds alike."""
    return (a * wx0 + b * wx1) * wy0 + (c * wx0 + d * wx1) * wy1


def argmax0(values: np.ndarray, best: np.ndarray) -> np.ndarray:
    """argmax over axis 0 of [C, ...] given best = values.max(0): the first class that
    reaches it, as np.argmax (which copies the array to reduce a leading axis: 19 ms for
    [150, 128, 128], against 0.5 ms here, cache warm). The class ids are counted down in
    the smallest type that holds them: uint8 up to 256 classes (int16 took 1.5 ms).
    NaN columns are left to np.argmax."""
    n = len(values)
    kind = np.uint8 if n <= 1 << 8 else np.int16 if n < 1 << 15 else np.int32
    rev = np.arange(n - 1, -1, -1, dtype=kind).reshape(-1, *[1] * best.ndim)
    arg = (n - 1) - ((values == best) * rev).max(0).astype(np.int64)
    nan = np.isnan(best)
    if nan.any():
        arg[nan] = values[:, nan].argmax(0)
    return arg


def ranked(logits: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The `r` best classes of each pixel of logits [C, ...] ([r, ...], best first; ties:
    the lower id first, as argmax), and the values of the r + 1 best ([r + 1, ...]; the
    last is the best logit of any class not ranked, -inf when none is left). Ranked
    RANK_PIXELS pixels at a time: the passes over one block's C values stay in the CPU's
    cache instead of reading the window's logits from memory each time."""
    flat = logits.reshape(len(logits), -1)
    classes = np.empty((r, flat.shape[1]), np.int64)
    values = np.empty((r + 1, flat.shape[1]), logits.dtype)
    for start in range(0, flat.shape[1], RANK_PIXELS):
        part = slice(start, start + RANK_PIXELS)
        classes[:, part], values[:, part] = _ranked(flat[:, part], r)
    return classes.reshape(r, *logits.shape[1:]), values.reshape(r + 1, *logits.shape[1:])


def _ranked(logits: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """`ranked` of logits [C, n]."""
    work = logits.copy()
    classes = np.empty((r, *logits.shape[1:]), np.int64)
    values = np.full((r + 1, *logits.shape[1:]), -np.inf, logits.dtype)
    for i in range(min(r + 1, len(logits))):
        values[i] = work.max(0)
        if i < r:
            classes[i] = argmax0(work, values[i])
            np.put_along_axis(work, classes[i][None], -np.inf, 0)
    classes[len(logits) :] = classes[:1]  # fewer classes than ranks: repeat the best
    return classes, values


def distinct(classes: np.ndarray) -> np.ndarray:
    """Each row's distinct ids of classes [n, k] (-1: none), as few columns as the row
    with the most needs; shorter rows repeat their first id. The corners and windows of
    a pixel mostly agree: 16 candidates are 2 or 3 classes."""
    big = np.iinfo(np.int64).max
    rows = np.sort(np.where(classes < 0, big, classes), 1)
    rows[:, 1:][rows[:, 1:] == rows[:, :-1]] = big
    rows.sort(1)
    width = max(1, int((rows < big).sum(1).max()))
    rows = rows[:, :width]
    return np.where(rows == big, rows[:, :1], rows)


class _Held:
    """One window's logits at the model's resolution, kept while a pixel it covers is
    unfinished; after a band, only the source rows later bands still need.

    Beside the logits [C, h, w]: each source pixel's best class and the best logit of
    any other class, and for each output pixel of the window its pure label (the class
    leading at all four corners of its source cell by more than SURE_MARGIN, or -1)."""

    def __init__(self, win: Window, logits: np.ndarray, input_size, weights):
        c, lh, lw = logits.shape
        wh, ww = win.size
        self.win = win
        self.ry = _axis(lh, input_size[0], wh)
        self.rx = _axis(lw, input_size[1], ww)
        self.logits = np.ascontiguousarray(logits, dtype=F32)
        ranks, self.ranked = ranked(self.logits, RANKS)
        # max |logit| without an |logits| temporary: 3x faster on [150, 128, 128]
        self.scale = 0.0
        if self.logits.size:  # NaN logits: a NaN scale (never sure), as np.abs(...).max()
            self.scale = max(float(self.ranked[0].max()), -float(self.logits.min()))
        self.ranks = ranks.astype(np.int16 if c < 1 << 15 else np.int32)
        with np.errstate(invalid="ignore"):  # NaN or inf logits: never sure
            self.gap = self.ranked[0] - self.ranked[1]  # the best logit's lead (_lead_at)
            sure = np.where(self.gap > SURE_MARGIN * self.scale, self.ranks[0], -1)
        down, right = np.minimum(np.arange(lh) + 1, lh - 1), np.minimum(np.arange(lw) + 1, lw - 1)
        same = (sure == sure[down]) & (sure == sure[:, right]) & (sure == sure[down][:, right])
        cells = np.where(same, sure, -1).astype(self.ranks.dtype)
        self.src0 = 0  # first source row still held
        self._offsets()
        self.pure = cells[self.ry[0]][:, self.rx[0]]  # [wh, ww]
        u, v = np.nonzero(self.pure < 0)
        if u.size:
            self.pure[u, v] = self._leading(u, v, cells, SURE_MARGIN * self.scale)
        self.weights = weights  # [wh, ww] float32, or None for the mean
        self.u0 = 0  # first window row still held

    def keep_from(self, y: int) -> None:
        """Forget the rows above image row `y` (all finished)."""
        u = y - self.win.y1
        if u <= self.u0:
            return
        src = int(self.ry[0][u])
        cut = src - self.src0
        self.logits = self.logits[:, cut:].copy()
        self.ranks, self.ranked = self.ranks[:, cut:].copy(), self.ranked[:, cut:].copy()
        self.gap = self.gap[cut:].copy()
        self.pure = self.pure[u - self.u0 :].copy()
        self.u0, self.src0 = u, src
        self._offsets()

    def _offsets(self) -> None:
        """Each window row's flat offsets of its top and bottom source rows in the logits
        held (rows above src0 are finished and never asked for)."""
        lw = self.logits.shape[2]
        self.top, self.bottom = ((i - self.src0) * lw for i in self.ry[:2])

    def pure_at(self, ys: slice, xs: slice) -> np.ndarray:
        """The pure labels of image rows `ys`, columns `xs` (inside the window)."""
        top, left = self.win.y1 + self.u0, self.win.x1
        return self.pure[ys.start - top : ys.stop - top, xs.start - left : xs.stop - left]

    def _corners(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
        """Flat indices (into one class plane) of the four source corners of window pixels
        (u, v), and their weights as [n, 1] columns: (top-left, top-right, bottom-left,
        bottom-right, wx0, wx1, wy0, wy1)."""
        top, bottom, wy0, wy1 = self.top[u], self.bottom[u], self.ry[2][u], self.ry[3][u]
        j0, j1, wx0, wx1 = (a[v] for a in self.rx)
        weights = tuple(a[:, None] for a in (wx0, wx1, wy0, wy1))
        return (top + j0, top + j1, bottom + j0, bottom + j1, *weights)

    def _leading(self, u: np.ndarray, v: np.ndarray, cells: np.ndarray, tol: float) -> np.ndarray:
        """For window pixels (u, v) of mixed cells (`cells` < 0): the class that leads every
        other class of this window by more than `tol` after resizing, else -1. Tried: the
        best class at the nearest corner of the pixel's source cell, then where that fails
        another corner's best class (one class's lead bound each, `lead`, not C values).
        The corners' leads of each cell's 4 corner classes are computed once per cell and
        shared by the ~16 pixels of the cell (the same values as per pixel: bit for bit)."""
        lh, lw = cells.shape
        mixed = np.flatnonzero(cells.reshape(-1) < 0)
        ci, cj = np.divmod(mixed, lw)
        down, right = (ci + (ci < lh - 1)) * lw, cj + (cj < lw - 1)
        corners = (ci * lw + cj, ci * lw + right, down + cj, down + right)
        first = self.ranks[0].reshape(-1)
        classes = np.stack([first[i] for i in corners]).astype(np.int64)  # [4, cells]
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, never sure
            leads = np.stack([self._corner_leads(corners, k) for k in classes])  # [4, 4, cells]
        slot = np.empty(lh * lw, np.intp)
        slot[mixed] = np.arange(mixed.size)
        pos = slot[self.ry[0][u] * lw + self.rx[0][v]]  # each pixel's mixed cell
        wy0, wy1, wx0, wx1 = self.ry[2][u], self.ry[3][u], self.rx[2][v], self.rx[3][v]
        left = wx0 >= wx1
        near = np.where(wy0 >= wy1, np.where(left, 0, 1), np.where(left, 2, 3))
        flat = leads.reshape(-1)

        def lead(q: np.ndarray, at: np.ndarray, w: tuple[np.ndarray, ...]) -> np.ndarray:
            """The blend (as _lead_at) of the corner leads of cells `at`'s class q."""
            return _bilinear(*(flat[(q * 4 + i) * mixed.size + at] for i in range(4)), *w)

        k = classes[near, pos]
        with np.errstate(invalid="ignore"):
            out = np.where(lead(near, pos, (wx0, wx1, wy0, wy1)) > tol, k, -1)
            failed = np.flatnonzero(out < 0)
            differ = classes[:, pos[failed]] != k[failed]
            retry = differ.any(0)
            miss, q = failed[retry], differ[:, retry].argmax(0)
            if miss.size:
                w = tuple(x[miss] for x in (wx0, wx1, wy0, wy1))
                k2 = classes[q, pos[miss]]
                out[miss] = np.where(lead(q, pos[miss], w) > tol, k2, -1)
        return out

    def lead(self, u: np.ndarray, v: np.ndarray, k: np.ndarray) -> np.ndarray:
        """A lower bound (up to float32 rounding) of how far class k [n] leads every other
        class at window pixels (u, v) after resizing: the blend of k's logit minus the
        best other logit at the four corners of each pixel's source cell."""
        return self._lead_at(self._corners(u, v), k)

    def _lead_at(self, corners: Sequence[np.ndarray], k: np.ndarray) -> np.ndarray:
        """`lead` for pixels whose `_corners` are already known."""
        with np.errstate(invalid="ignore"):
            leads = self._corner_leads(corners[:4], k)
            return _bilinear(*leads, *(w[:, 0] for w in corners[4:]))

    def _corner_leads(self, corners: Sequence[np.ndarray], k: np.ndarray) -> list[np.ndarray]:
        """k's logit minus the best logit of any other class, at each of `corners` (flat
        indices into one class plane): where k holds or ties the best logit, the best's
        gap to the second (a tie makes the second equal the best: a gap of 0, as k's logit
        minus the best). 3 gathers a corner, not 4 with the class ids."""
        best, gap = self.ranked[0].reshape(-1), self.gap.reshape(-1)
        at = k * (self.logits.shape[1] * self.logits.shape[2])
        flat = self.logits.reshape(-1)
        out = []
        for i in corners:
            value, top = flat[at + i], best[i]
            out.append(np.where(value == top, gap[i], value - top))
        return out

    def values(
        self, u: np.ndarray, v: np.ndarray, classes: np.ndarray | None, *, fused: bool, at=None
    ) -> np.ndarray:
        """[n, k] resized logits of the `classes` [n, k] (None: every class, k = C) at
        window pixels (u, v), along x then y. `fused`: with torch's float32 operations
        exactly (each step fma(first, w0, second * w1)); else plain float32, within a few
        units of the last place, and 3x faster. `at`: the pixels' `_corners`, if known."""
        a, b, c, d, wx0, wx1, wy0, wy1 = self._corners(u, v) if at is None else at
        if classes is None:  # each class plane's corners in one pass: no [n, C] indices
            planes = self.logits.reshape(len(self.logits), -1)
            ta, tb, tc, td = (planes.take(k, axis=1).T for k in (a, b, c, d))
        else:
            plane = self.logits.shape[1] * self.logits.shape[2]
            flat = self.logits.reshape(-1)
            base = classes * plane
            ta, tb, tc, td = (flat.take(base + k[:, None]) for k in (a, b, c, d))
        if fused:
            t0 = _fma(ta, wx0, tb * wx1)
            t1 = _fma(tc, wx0, td * wx1)
            return _fma(t0, wy0, t1 * wy1)
        ta *= wx0
        tb *= wx1
        ta += tb
        tc *= wx0
        td *= wx1
        tc += td
        ta *= wy0
        tc *= wy1
        ta += tc
        return ta

    def candidates(self, at: Sequence[np.ndarray], t: int) -> np.ndarray:
        """The `t`-th best class at each corner of pixels' source cells [n, 4] (the better
        ones are the earlier rounds' candidates). `at`: the pixels' `_corners`."""
        rank = self.ranks[t - 1].reshape(-1)
        return np.stack([rank[k] for k in at[:4]], 1).astype(np.int64)

    def rest(
        self, at: Sequence[np.ndarray], known: int, taken: np.ndarray, rows: np.ndarray
    ) -> np.ndarray:
        """A bound on the blend of every class outside the pixels' candidates, for pixels
        whose `_corners` are `at` and whose candidates hold the `known` best at each corner
        (0: maybe none). `taken` (bool, flat) marks each pixel's candidates: class c of
        pixel i at rows[i] + c (a table of the block's pixels, shared by its windows). At each
        corner such a class is at most the best logit of a class outside them, which is
        the (known+1)-th best, or the next where that class is taken too (and so on, as
        far as the ranks go); so it blends to at most the blend of those (plus rounding).
        Walking past the classes taken matters: where windows disagree, the two leaders
        are mostly each other's runner-up, and bounding by the class below it let the
        first candidate round prove 261,000 pixels instead of 191,000 (2048^2 replay, 150
        classes, random weights): half as many reached the second round."""
        bound = []
        for i in at[:4]:
            value, walking = self.ranked[known].reshape(-1)[i], np.ones(len(i), bool)
            for j in range(known, RANKS):
                walking &= taken[rows + self.ranks[j].reshape(-1)[i]]
                value = np.where(walking, self.ranked[j + 1].reshape(-1)[i], value)
            bound.append(value)
        with np.errstate(invalid="ignore"):
            return _bilinear(*bound, *(w[:, 0] for w in at[4:]))


class TileBlender:
    """Takes each window's logits in grid order (`add`) and hands out the label map's bands
    as soon as no later window touches them (`finished`).

    `weights(h, w)` gives a window's importance map (float32, > 0), or None for
    MMSegmentation's plain average.
    """

    def __init__(self, grid: Grid, num_classes: int, weights=None):
        self.grid = grid
        self.num_classes = num_classes
        self.dtype = label_dtype(num_classes)
        self._weights = weights
        self._held: list[_Held] = []  # in grid order
        self._added = 0
        self._band = 0  # the band being finished
        self._x_done = 0  # its columns finished so far
        self._labels: np.ndarray | None = None  # that band's labels

    def held_floats(self) -> int:
        """Logits held now (a measure of the memory in use)."""
        return sum(h.logits.size for h in self._held)

    def add(self, win: Window, logits: np.ndarray, input_size: tuple[int, int]) -> None:
        """One window's logits [C, h, w] for a model input of `input_size` (the window, or
        the tile it was padded to: the logits are resized to that, then cut to the window)."""
        expected = divmod(self._added, len(self.grid.xs))
        if (win.row, win.col) != expected or logits.ndim != 3:
            raise ValueError(f"windows go in grid order: expected {expected}, got {win}")
        if logits.shape[0] != self.num_classes:
            raise ValueError(f"{logits.shape[0]} classes of logits, expected {self.num_classes}")
        weights = None if self._weights is None else self._weights(*win.size)
        self._held.append(_Held(win, logits, input_size, weights))
        self._added += 1

    def finished(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, labels [rows, width]) of every band the windows added so far finish."""
        grid, cols = self.grid, len(self.grid.xs)
        while self._band < len(grid.ys):
            if self._added >= (self._band + 1) * cols:
                limit = grid.width
            elif self._added > self._band * cols:
                limit = grid.xs[self._added - self._band * cols]  # the next window's x1
            else:
                return
            y0, y1 = grid.ys[self._band], grid.band_end(self._band)
            if self._labels is None:
                self._labels = np.empty((y1 - y0, grid.width), self.dtype)
            for xa in range(self._x_done, limit, REGION_COLUMNS):
                xb = min(xa + REGION_COLUMNS, limit)
                self._labels[:, xa:xb] = self._finish(slice(y0, y1), slice(xa, xb))
            self._x_done = max(self._x_done, limit)
            self._forget(y1)
            if self._x_done < grid.width:
                return
            band, self._labels = self._labels, None
            self._band, self._x_done = self._band + 1, 0
            yield y0, band

    def _forget(self, band_end: int) -> None:
        """Windows whose columns of this band are all finished: keep only their rows
        below it, or drop them when they have none."""
        kept = []
        for h in self._held:
            if h.win.x2 <= self._x_done and h.win.y1 < band_end:
                if h.win.y2 <= band_end:
                    continue
                h.keep_from(band_end)
            kept.append(h)
        self._held = kept

    def _covering(self, ys: slice, xs: slice) -> list[tuple[_Held, slice, slice]]:
        out = []
        for h in self._held:
            w = h.win
            if w.y1 < ys.stop and w.y2 > ys.start and w.x1 < xs.stop and w.x2 > xs.start:
                sy = slice(max(w.y1, ys.start), min(w.y2, ys.stop))
                sx = slice(max(w.x1, xs.start), min(w.x2, xs.stop))
                out.append((h, sy, sx))
        return out

    def _finish(self, ys: slice, xs: slice) -> np.ndarray:
        """Labels of the region `ys` x `xs`, every window covering it being held."""
        cover = self._covering(ys, xs)
        lab = np.full((ys.stop - ys.start, xs.stop - xs.start), -2, np.int32)  # -2: none yet
        for h, sy, sx in cover:
            here = (
                slice(sy.start - ys.start, sy.stop - ys.start),
                slice(sx.start - xs.start, sx.stop - xs.start),
            )
            pure, cur = h.pure_at(sy, sx), lab[here]
            lab[here] = np.where((cur == -2) | (cur == pure), pure, -1)
        rows, cols = np.nonzero(lab < 0)
        if rows.size:
            lab[rows, cols] = self._exact(rows + ys.start, cols + xs.start, cover)
        return lab.astype(self.dtype)

    def _exact(self, ys: np.ndarray, xs: np.ndarray, cover) -> np.ndarray:
        """Labels of pixels (ys, xs) from their blends (see the module docstring): computed
        for the best class, then the RANKS best, at each corner of each covering window, and
        for every class where these candidates cannot be proven to hold the winner."""
        out = np.empty(ys.size, np.int64)
        for start in range(0, ys.size, BLOCK_PIXELS):
            y, x = ys[start : start + BLOCK_PIXELS], xs[start : start + BLOCK_PIXELS]
            labels, proven = self._leaders(y, x, cover)
            todo, tried = np.flatnonzero(~proven), None
            for t in range(1, RANKS + 1):
                if not todo.size:
                    break
                found, proven, tried = self._candidates(y[todo], x[todo], cover, t, tried)
                labels[todo[proven]] = found[proven]
                todo, tried = todo[~proven], tuple(a[~proven] for a in tried)
            if todo.size:
                labels[todo] = self._every(y[todo], x[todo], cover)
            out[start : start + BLOCK_PIXELS] = labels
        return out

    def _leaders(self, y: np.ndarray, x: np.ndarray, cover) -> tuple[np.ndarray, np.ndarray]:
        """(labels, proven) for pixels (y, x) where the covering windows disagree or one is
        unsure. A class k is proven where the (weighted) mean over the covering windows of
        k's lead bound (_Held.lead) is over the margin: k's lead over any class c in the
        blend is at least that. Tried: the first covering window's own leader (its `pure`
        label), then another window's that differs."""
        inside = list(self._inside(y, x, cover))
        first, other = np.full(y.size, -1, np.int64), np.full(y.size, -1, np.int64)
        count = np.zeros(y.size, F32)
        for h, idx, u, v, weight in inside:
            count[idx] += F32(1) if weight is None else weight
            k, f, o = h.pure[u - h.u0, v], first[idx], other[idx]
            first[idx] = np.where(f < 0, k, f)
            other[idx] = np.where((o < 0) & (k >= 0) & (k != first[idx]), k, o)
        labels, proven = np.full(y.size, -1, np.int64), np.zeros(y.size, bool)
        tol = SURE_MARGIN * max(h.scale for h, *_ in inside)
        for k in (first, other):
            tried = ~proven & (k >= 0)
            if not tried.any():
                continue
            lead = np.zeros(y.size, F32)
            for h, idx, u, v, weight in inside:
                sel = np.flatnonzero(tried[idx])
                d = h.lead(u[sel], v[sel], k[idx[sel]])
                lead[idx[sel]] += d if weight is None else d * weight[sel]
            with np.errstate(invalid="ignore"):
                won = np.flatnonzero(tried & (lead / count > tol))
            labels[won], proven[won] = k[won], True
        return labels, proven

    def _every(self, y: np.ndarray, x: np.ndarray, cover) -> np.ndarray:
        """Labels of pixels (y, x) from the blends of every class: plain float32 first
        (1.5x faster over 150 classes than torch's fused operations, which took 11.7 of
        the ~55 ms of blending per window of SegFormer b0 with random weights); then,
        where other classes come within rounding of the best, only those again with
        torch's operations, whose ties decide. A class further below cannot win (as in
        _candidates). Pixels with NaN or inf: every class, fused."""
        inside = list(self._inside(y, x, cover))
        every = np.broadcast_to(np.arange(self.num_classes), (y.size, self.num_classes))
        total = self._totals(inside, every, fused=False, every=True)
        best = total.max(1)
        labels = np.where(total == best[:, None], every, self.num_classes).min(1)
        tol = SURE_MARGIN * max(h.scale for h, *_ in inside)
        with np.errstate(invalid="ignore"):
            near = total >= best[:, None] - tol
        near[~np.isfinite(best) | (not np.isfinite(tol))] = True
        close = np.flatnonzero(near.sum(1) > 1)
        if close.size:
            classes = distinct(np.where(near[close], every[close], -1))
            labels[close] = self._blend(y[close], x[close], cover, classes, fused=True)[0]
        return labels

    def _inside(self, y: np.ndarray, x: np.ndarray, cover):
        """(held window, indices of the pixels inside it, their window coordinates u, v,
        their weights or None), for each covering window, in grid order."""
        for h, _, _ in cover:
            w = h.win
            idx = np.flatnonzero((y >= w.y1) & (y < w.y2) & (x >= w.x1) & (x < w.x2))
            if idx.size:
                u, v = y[idx] - w.y1, x[idx] - w.x1
                yield h, idx, u, v, None if h.weights is None else h.weights[u, v]

    def _candidates(
        self, y: np.ndarray, x: np.ndarray, cover, t: int, tried=None
    ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """(labels, proven, (classes, blends)) for pixels (y, x) from the blends of their
        candidate classes only: the `t` best at each corner of their cell in each covering
        window. Any other class blends at most to `rest` (_Held.rest); where the
        winner leads that by more than rounding could change, it is the label. Plain
        float32 first; where two candidates are that close, again with torch's operations,
        whose ties decide. `tried`: the classes [n, k] and plain float32 blends of rounds
        t - 1 and before for these pixels, which are not blended again (each class's blend
        is computed alone: the same values bit for bit); only the `t`-th best at each
        corner that they lack are blended."""
        inside = list(self._inside(y, x, cover))
        at = [h._corners(u, v) for h, _, u, v, _ in inside]  # shared by both blends below
        seen = np.zeros(y.size, np.int64)
        for _, idx, _, _, _ in inside:
            seen[idx] += 1
        fresh = np.full((y.size, int(seen.max()), 4), -1, np.int64)  # [pixel, window, corner]
        seen[:] = 0
        count = np.zeros(y.size, F32)
        for (h, idx, _, _, weight), corners in zip(inside, at, strict=True):
            fresh[idx, seen[idx]] = h.candidates(corners, t)
            seen[idx] += 1
            count[idx] += F32(1) if weight is None else weight
        fresh = fresh.reshape(y.size, -1)
        # Each pixel's classes blended so far (last column: -1): what round t adds to
        # them, and what _Held.rest walks past.
        taken = np.zeros((y.size, self.num_classes + 1), bool)
        rows = np.arange(y.size)[:, None]
        if tried is None:
            classes = distinct(fresh)
            total = self._totals(inside, classes, fused=False, at=at)
        else:
            old, old_total = tried
            taken[rows, old] = True
            fresh[taken[rows, fresh]] = -1
            fresh[:, 0] = np.where((fresh < 0).all(1), old[:, 0], fresh[:, 0])  # none new
            fresh = distinct(fresh)
            classes = np.concatenate([old, fresh], 1)
            total = np.concatenate([old_total, self._totals(inside, fresh, fused=False, at=at)], 1)
        taken[rows, classes] = True
        rest = np.zeros(y.size, F32)
        for (h, idx, _, _, weight), corners in zip(inside, at, strict=True):
            other = h.rest(corners, t, taken.reshape(-1), idx * taken.shape[1])
            rest[idx] += other if weight is None else other * weight
        labels, best, runner_up = self._pick(total, classes)
        tol = SURE_MARGIN * max(h.scale for h, *_ in inside)
        with np.errstate(invalid="ignore"):  # -inf rest (no other class): proven
            proven = best - rest / count > tol
        close = np.flatnonzero(proven & ~(best - runner_up > tol))
        if close.size:  # candidates within rounding of each other: torch's ties decide
            labels[close] = self._blend(y[close], x[close], cover, classes[close], fused=True)[0]
        return labels, proven, (classes, total)

    def _blend(self, y, x, cover, classes: np.ndarray, *, fused: bool):
        """(labels, best score, best score of another class) of pixels (y, x) over the
        `classes` [n, k] of each: the covering windows' resized logits, added in grid
        order (MMSegmentation's), divided by their count or summed weights."""
        inside = list(self._inside(y, x, cover))
        return self._pick(self._totals(inside, classes, fused=fused), classes)

    def _pick(self, total: np.ndarray, classes: np.ndarray):
        """(labels, best score, best score of another class) from the blends `total` [n, k]
        of the `classes` [n, k]: the first maximum (the lowest id among equal blends)."""
        # Reduced along axis 0 of [k, n] copies: numpy reduces a short last axis row by row,
        # 0.76 ms for [16384, 3] against 0.01 ms transposed (2-core AVX2 EPYC). Max and min
        # are exact in any order: the same values.
        total, classes = np.ascontiguousarray(total.T), np.ascontiguousarray(classes.T)
        best = total.max(0)
        labels = np.where(total == best, classes, self.num_classes).min(0)
        runner_up = np.where(classes == labels, -np.inf, total).max(0)
        return labels, best, runner_up

    def _totals(
        self, inside, classes: np.ndarray, *, fused: bool, every=False, at=None
    ) -> np.ndarray:
        """[n, k] blends of the `classes` [n, k] of the pixels of `inside` (_inside's
        tuples): added in grid order (MMSegmentation's), divided by their count or summed
        weights. `every`: the classes are every class in order (_Held.values' fast path).
        `at`: each window's `_Held._corners` of its pixels, if known."""
        total = np.zeros(classes.shape, F32)
        count = np.zeros(len(classes), F32)
        for i, (h, idx, u, v, weight) in enumerate(inside):
            corners = None if at is None else at[i]
            value = h.values(u, v, None if every else classes[idx], fused=fused, at=corners)
            total[idx] += value if weight is None else value * weight[:, None]
            count[idx] += F32(1) if weight is None else weight
        total /= count[:, None]
        return total
