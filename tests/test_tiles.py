"""Sliding-window inference (segdeploy.runtime.tiles, tile_blend): exact against
MMSegmentation's slide mode, bounded memory, and the options that choose the windows.

The reference is MMSegmentation's `EncoderDecoder.slide_inference` loop itself,
written with the torch operations it runs (`F.interpolate` to the window,
`F.pad` into a C x H x W buffer, a count matrix, division, argmax), around an
identity-like model: logits that are a fixed function of the window's pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmseg_reference import linear_model, mmseg_slide, photo, prepare

from segdeploy.errors import SegdeployError
from segdeploy.runtime import tile_blend
from segdeploy.runtime.large_image import ArraySource
from segdeploy.runtime.tile_blend import RANKS, Grid, TileBlender, _Held, argmax0, ranked
from segdeploy.runtime.tiles import (
    TileOptions,
    TilePlan,
    WindowModel,
    gaussian_weights,
    plan_tiles,
    predict_bands,
)


def tiled(image, run, classes, plan, batch_size=3) -> np.ndarray:
    out = np.full(image.shape[:2], -1, np.int64)
    rows = 0
    for y0, band in predict_bands(
        ArraySource(image), WindowModel(prepare, run, classes), plan, batch_size
    ):
        assert y0 == rows, "bands come top to bottom, without gaps"
        out[y0 : y0 + len(band)] = band
        rows += len(band)
    assert rows == image.shape[0]
    return out


# (height, width, tile, stride, logit stride): sizes that the stride divides (80 = 32 + 3 x
# 16), sizes it does not, images smaller than a window on one side or both, non-square.
EXACT_CASES = [
    (80, 96, (32, 32), (16, 16), 4),
    (80, 101, (32, 32), (21, 21), 4),
    (77, 90, (32, 32), (21, 21), 1),
    (20, 25, (32, 32), (21, 21), 4),
    (20, 140, (32, 32), (21, 21), 4),
    (150, 97, (48, 40), (31, 17), 4),
    (64, 64, (64, 64), (43, 43), 8),
    (101, 67, (32, 32), (32, 32), 4),  # no overlap
]


@pytest.mark.parametrize(("h", "w", "tile", "stride", "s"), EXACT_CASES)
@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_labels_equal_mmsegmentation_slide_inference(h, w, tile, stride, s, blend):
    image = photo(h, w, seed=h * w)
    run = linear_model(7, s)
    plan = TilePlan(tile, stride, blend)
    ours = tiled(image, run, 7, plan)
    ref = mmseg_slide(
        image, run, 7, tile, stride, gaussian_weights if blend == "gaussian" else None
    )
    assert (ours == ref).mean() == 1.0


def context_model(classes: int, stride: int):
    """linear_model plus a term of each window's mean colour, as attention mixes in the
    whole window: overlapping windows disagree near class borders, so pixels are decided
    from several windows' bounds and blends, not from one window's corners."""
    base = linear_model(classes, stride)
    mix = np.random.default_rng(1).standard_normal((classes, 3)).astype(np.float32)

    def run(x: np.ndarray) -> np.ndarray:
        context = np.einsum("ck,nk->nc", mix, x.mean((2, 3)))[:, :, None, None]
        return (base(x) + np.float32(0.5) * context).astype(np.float32)

    return run


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
@pytest.mark.parametrize(
    ("tile", "stride", "s"), [((32, 32), (21, 21), 4), ((48, 40), (23, 19), 1)]
)
def test_windows_that_disagree_still_equal_mmsegmentation(tile, stride, s, blend):
    image = photo(131, 157, seed=5, block=5)
    run = context_model(12, s)
    ours = tiled(image, run, 12, TilePlan(tile, stride, blend))
    ref = mmseg_slide(
        image, run, 12, tile, stride, gaussian_weights if blend == "gaussian" else None
    )
    assert (ours == ref).mean() == 1.0
    assert len(np.unique(ref)) >= 6  # class borders everywhere


def test_ties_and_near_ties_are_decided_as_torch_decides_them():
    """Logits with duplicated classes (exact ties: the lower id wins) and classes a few
    units of the last place apart: the shortcut must not decide these, the full
    computation with torch's own operations must."""
    base = linear_model(4, 4)

    def run(x):
        out = base(x)
        tied = np.concatenate([out, out[:, :1], out[:, :1] + np.float32(1e-6)], 1)
        return tied * np.float32(1000)  # large logits: their last place is coarse

    image = photo(90, 110, seed=3)
    plan = TilePlan((32, 32), (21, 21))
    ours = tiled(image, run, 6, plan)
    assert (ours == mmseg_slide(image, run, 6, (32, 32), (21, 21))).all()
    assert not (ours == 4).any()  # the copy of class 0 never beats class 0


def test_many_near_tied_classes_are_decided_as_torch_decides_them():
    """Three classes within a few units of the last place of each other lead everywhere:
    the two best at each corner cannot bound the rest, so every class is blended, and the
    near-tied ones again with torch's operations (TileBlender._every)."""
    base = linear_model(4, 4)

    def run(x):
        out = base(x)
        top = out.max(1, keepdims=True)
        near = [top + np.float32(k * 1e-6) for k in (0, 1, 2)]
        return np.concatenate([out, *near], 1) * np.float32(1000)

    image = photo(90, 110, seed=4)
    for blend in ("mean", "gaussian"):
        weights = gaussian_weights if blend == "gaussian" else None
        ours = tiled(image, run, 7, TilePlan((32, 32), (21, 21), blend))
        assert (ours == mmseg_slide(image, run, 7, (32, 32), (21, 21), weights)).all()


class _FullBlender(TileBlender):
    """TileBlender with every class of the pixels that reach the last step blended with
    torch's operations: what TileBlender._every's shortcut must equal."""

    def _every(self, y, x, cover):
        every = np.broadcast_to(np.arange(self.num_classes), (y.size, self.num_classes))
        return self._blend(y, x, cover, every, fused=True)[0]


def test_blending_every_class_in_float32_first_changes_no_label():
    """Classes one unit of the last place apart, where plain float32 and torch's fused
    operations can order them differently: the shortcut of TileBlender._every (float32 over
    every class, torch's operations over the near-tied ones) gives the labels of torch's
    operations over every class."""
    base = linear_model(4, 4)

    def run(x):
        out = base(x)
        top = out.max(1, keepdims=True)
        up = np.nextafter(top, np.float32(np.inf))
        return np.concatenate([out, top, up, np.nextafter(up, np.float32(np.inf))], 1)

    image = photo(90, 110, seed=4)
    for blend in ("mean", "gaussian"):
        plan = TilePlan((32, 32), (21, 21), blend)
        labels = {}
        for name, blender in (("shortcut", TileBlender), ("full", _FullBlender)):
            grid = plan.grid(*image.shape[:2])
            blend_ = blender(grid, 7, plan.weights())
            out = np.empty(image.shape[:2], np.int64)
            for win in grid.windows():
                crop = image[win.y1 : win.y2, win.x1 : win.x2]
                blend_.add(win, run(prepare(crop)[None])[0], win.size)
                for y0, band in blend_.finished():
                    out[y0 : y0 + len(band)] = band
            labels[name] = out
        assert (labels["shortcut"] == labels["full"]).all()
        assert len(np.unique(labels["full"])) >= 3


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_later_candidate_rounds_reuse_the_earlier_blends(monkeypatch, blend):
    """Round t of TileBlender._candidates blends only the t-th best classes that rounds
    before it lacked and reuses their blends of the others: the labels still equal
    MMSegmentation's where windows disagree and the pixels need a second round, which
    proves some pixels with the reused blends, and so does the last (RANKS-th)."""
    proven = {}
    real = TileBlender._candidates

    def spy(self, y, x, cover, t, tried=None):
        labels, won, out = real(self, y, x, cover, t, tried)
        proven[t] = proven.get(t, 0) + int(won.sum())
        if t > 1:  # the earlier classes come first, their blends unchanged
            old, old_total = tried
            assert (out[0][:, : old.shape[1]] == old).all()
            assert np.array_equal(out[1][:, : old.shape[1]], old_total)
        return labels, won, out

    monkeypatch.setattr(TileBlender, "_candidates", spy)
    image = photo(131, 157, seed=5, block=5)
    run = context_model(12, 4)
    ours = tiled(image, run, 12, TilePlan((32, 32), (21, 21), blend))
    weights = gaussian_weights if blend == "gaussian" else None
    assert (ours == mmseg_slide(image, run, 12, (32, 32), (21, 21), weights)).all()
    assert proven.get(2, 0) > 0 and proven.get(RANKS, 0) > 0, proven


@pytest.mark.parametrize("classes", [1, 3, 150, 256, 257, 300])
def test_argmax0_is_numpys_first_maximum(classes):
    """argmax0 counts class ids down in uint8 up to 256 classes, int16 above: ties (coarse
    integer logits) go to the lower id and NaN columns to numpy's answer, at both sizes."""
    rng = np.random.default_rng(classes)
    values = rng.integers(-3, 4, (classes, 17, 19)).astype(np.float32)
    values[-1, 0, :5] = 9  # the last class leads a few pixels: id 255 in uint8 at 256
    values[rng.integers(classes), 2, 3] = np.nan
    best = values.max(0)
    assert (argmax0(values, best) == np.argmax(values, 0)).all()


def test_lead_bound_is_k_minus_the_best_other_class_at_each_corner():
    """_Held.lead (the best's gap where k holds or ties the best logit, else k's logit minus
    the best) equals the blend, in the same float32 steps, of k's logit minus the largest
    logit of any other class at the four corners, for every k, ties included."""
    rng = np.random.default_rng(5)
    logits = rng.integers(-2, 3, (6, 8, 8)).astype(np.float32)  # many ties
    logits[:, 0, 0] = [1, 1, 1, 0, -1, np.inf]  # an infinite logit: NaN or -inf
    held = _Held(Grid.over(32, 32, (32, 32), (32, 32)).window(0, 0), logits, (32, 32), None)
    u, v = (a.reshape(-1) for a in np.mgrid[:32, :32])
    i0, i1, wy0, wy1 = (a[u] for a in held.ry)
    j0, j1, wx0, wx1 = (a[v] for a in held.rx)
    for k in range(6):
        others = np.delete(logits, k, 0).max(0)
        lead = logits[k] - others
        with np.errstate(invalid="ignore"):
            top = lead[i0, j0] * wx0 + lead[i0, j1] * wx1
            want = top * wy0 + (lead[i1, j0] * wx0 + lead[i1, j1] * wx1) * wy1
            got = held.lead(u, v, np.full(u.size, k))
        assert np.array_equal(got, want, equal_nan=True), k


def test_rest_bound_is_the_best_class_outside_the_candidates_at_each_corner():
    """_Held.rest with two candidate classes a pixel (any two: `known` 0) walks down each
    corner's ranks past the classes taken, so with RANKS >= 2 it reaches the best class
    outside them at every corner: the bound equals, in the same float32 steps, the blend
    of those corners' best logits outside the pair, whether the pair holds the corner's
    best, its second, both or neither."""
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(6, 8, 8)).astype(np.float32)
    held = _Held(Grid.over(32, 32, (32, 32), (32, 32)).window(0, 0), logits, (32, 32), None)
    u, v = (a.reshape(-1) for a in np.mgrid[:32, :32])
    i0, i1, wy0, wy1 = (a[u] for a in held.ry)
    j0, j1, wx0, wx1 = (a[v] for a in held.rx)
    first, second = held.ranks[0][i0, j0], held.ranks[1][i0, j0]
    pick = np.arange(u.size) % 4  # the top-left corner's best, second, both, neither
    pair = np.stack([np.where(pick % 2 == 0, first, (first + 1) % 6), second], 1)
    pair[pick == 3] = np.stack([(second + 1) % 6, (second + 2) % 6], 1)[pick == 3]
    outside = np.ones((u.size, 6), bool)
    outside[np.arange(u.size)[:, None], pair] = False
    corner = [logits[:, i, j].T for i, j in ((i0, j0), (i0, j1), (i1, j0), (i1, j1))]
    best = [np.where(outside, c, -np.inf).max(1) for c in corner]
    want = (best[0] * wx0 + best[1] * wx1) * wy0 + (best[2] * wx0 + best[3] * wx1) * wy1
    got = held.rest(held._corners(u, v), 0, ~outside.reshape(-1), np.arange(u.size) * 6)
    assert np.array_equal(got, want)
    # the cases all occur at the top-left corner: best and second taken, best alone, second alone
    t0, t1 = ((pair == held.ranks[r][i0, j0][:, None]).any(1) for r in (0, 1))
    assert (t0 & t1).any() and (t0 & ~t1).any() and (~t0 & t1).any()


def test_every_class_values_equal_the_indexed_ones():
    """_Held.values over every class (classes=None: one pass per class plane, what
    TileBlender._every uses) equals the same classes given as indices, bit for bit, in
    plain float32 and with torch's fused operations."""
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(7, 9, 11)).astype(np.float32)
    held = _Held(Grid.over(36, 44, (36, 44), (36, 44)).window(0, 0), logits, (36, 44), None)
    u, v = rng.integers(0, 36, 200), rng.integers(0, 44, 200)
    every = np.broadcast_to(np.arange(7), (200, 7))
    for fused in (False, True):
        got = held.values(u, v, None, fused=fused)
        assert got.shape == (200, 7)
        assert np.array_equal(got, held.values(u, v, every, fused=fused))
    want = F.interpolate(torch.from_numpy(logits)[None], (36, 44), mode="bilinear")[0]
    assert np.allclose(held.values(u, v, None, fused=False), want.numpy()[:, u, v].T, atol=1e-6)


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_ranked_in_blocks_of_pixels_is_a_stable_sort(monkeypatch, block):
    """ranked, block by block of pixels (uneven last block) or whole: the best classes
    and values of a stable descending sort over the classes (ties: the lower id first)."""
    monkeypatch.setattr(tile_blend, "RANK_PIXELS", block)
    rng = np.random.default_rng(7)
    logits = rng.integers(-3, 4, (9, 13, 11)).astype(np.float32)  # many ties
    order = np.argsort(-logits, axis=0, kind="stable")
    classes, values = ranked(logits, 2)
    assert (classes == order[:2]).all()
    assert (values == np.take_along_axis(logits, order[:3], 0)).all()


@pytest.mark.parametrize("shape", [(6, 9, 11), (4, 1, 7)])
def test_pure_labels_of_mixed_cells_follow_the_per_pixel_rule(shape):
    """_Held's pure labels, whose mixed cells share their corners' leads among their
    pixels: equal to the rule applied pixel by pixel with _Held.lead: the best class at
    the nearest corner of the pixel's cell if its lead passes the margin, else the first
    corner's class that differs if that one's does, else -1."""
    rng = np.random.default_rng(8)
    logits = rng.integers(-4, 5, shape).astype(np.float32)
    logits[0] += 3 * (np.arange(shape[2]) < shape[2] // 2)  # some pure cells too
    h, w = shape[1] * 4, shape[2] * 4
    held = _Held(Grid.over(h, w, (h, w), (h, w)).window(0, 0), logits, (h, w), None)
    u, v = (a.reshape(-1) for a in np.mgrid[:h, :w])
    i0, i1, wy0, wy1 = (a[u] for a in held.ry)
    j0, j1, wx0, wx1 = (a[v] for a in held.rx)
    first = held.ranks[0]
    corners = np.stack([first[i0, j0], first[i0, j1], first[i1, j0], first[i1, j1]])
    near = np.where(wy0 >= wy1, np.where(wx0 >= wx1, 0, 1), np.where(wx0 >= wx1, 2, 3))
    tol = tile_blend.SURE_MARGIN * held.scale
    k = corners[near, np.arange(u.size)]
    want = np.where(held.lead(u, v, k) > tol, k, -1)
    differ = (corners != k) & (want < 0)
    k2 = corners[differ.argmax(0), np.arange(u.size)]
    retry = differ.any(0)
    want[retry] = np.where(held.lead(u, v, k2)[retry] > tol, k2[retry], -1)
    gap = held.ranked[0] - held.ranked[1]
    sure = np.where(gap > tol, first, -1)
    sure = np.stack([sure[i0, j0], sure[i0, j1], sure[i1, j0], sure[i1, j1]])
    pure = (sure == sure[:1]).all(0) & (sure[0] >= 0)  # cells of one sure class
    got = held.pure.reshape(-1)
    assert (got == np.where(pure, sure[0], want)).all()
    assert pure.any() and (~pure & (want >= 0)).any() and (want < 0).any()


def test_constant_logits_give_class_zero():
    run = lambda x: np.zeros((len(x), 5, x.shape[2] // 4, x.shape[3] // 4), np.float32)  # noqa: E731
    assert (tiled(photo(50, 70), run, 5, TilePlan((32, 32), (21, 21))) == 0).all()


def test_window_placement_is_mmsegmentations():
    grid = Grid.over(600, 1000, (512, 512), (341, 341))
    boxes = [(w.y1, w.y2, w.x1, w.x2) for w in grid.windows()]
    # h_grids = (600 - 512 + 340) // 341 + 1 = 2; the last row shifted flush to the border
    assert grid.ys == (0, 88) and grid.xs == (0, 341, 488)
    assert boxes[0] == (0, 512, 0, 512) and boxes[-1] == (88, 600, 488, 1000)
    small = Grid.over(100, 700, (512, 512), (341, 341))
    assert [(w.y1, w.y2) for w in small.windows()] == [(0, 100)] * 2  # (700 - 512 + 340) // 341 + 1


def test_memory_follows_a_row_of_windows_not_the_image():
    """The blender's peak holding is the same for an image 4x taller (same last-row shift):
    it follows the width, a row of windows, and windows are cut to the rows that later
    bands need as soon as a band is done."""

    def peak(height: int) -> int:
        grid = Grid.over(height, 300, (32, 32), (21, 21))
        blender = TileBlender(grid, 6)
        run, most = linear_model(6, 4), 0
        for win in grid.windows():
            pixels = photo(32, 32, seed=win.row * 100 + win.col)[
                : win.y2 - win.y1, : win.x2 - win.x1
            ]
            blender.add(win, run(prepare(pixels)[None])[0], win.size)
            list(blender.finished())
            most = max(most, blender.held_floats())
        return most

    floats_per_window = 6 * 8 * 8
    columns = len(Grid.over(100, 300, (32, 32), (21, 21)).xs)
    tall, taller = peak(200), peak(200 + 21 * 28)
    assert tall == taller
    assert tall <= columns * floats_per_window  # less than one row of whole windows


def test_gaussian_weights_are_monais():
    w = gaussian_weights(64, 48)
    assert w.shape == (64, 48) and w.dtype == np.float32
    # centre ~1, sigma = 0.125 x side, floored at 1e-3 (MONAI's min_non_zero)
    assert w.max() == pytest.approx(np.exp(-(0.5**2) / (2 * 8**2)) * np.exp(-(0.5**2) / (2 * 6**2)))
    assert w.min() == pytest.approx(1e-3)
    assert w[32, 24] > w[32, 40] > w[32, 47]


# -- options -------------------------------------------------------------------------


class Processor:
    def __init__(self, size=(512, 512), pad_divisor=None):
        self.size, self.pad_divisor = size, pad_divisor


def test_stride_from_overlap_and_defaults():
    plan = plan_tiles(TileOptions("auto"), graph_size=None, processor=Processor())
    assert plan.tile == (512, 512) and plan.stride == (341, 341) and not plan.pad
    half = plan_tiles(TileOptions(256, overlap=0.5), graph_size=None, processor=Processor())
    assert half.tile == (256, 256) and half.stride == (128, 128)
    rect = plan_tiles(
        TileOptions((256, 384), stride=(100, 200)), graph_size=None, processor=Processor()
    )
    assert rect.tile == (256, 384) and rect.stride == (100, 200)


def test_fixed_size_graphs_tile_at_their_size_and_pad():
    plan = plan_tiles(TileOptions("auto"), graph_size=(513, 513), processor=Processor((513, 513)))
    assert plan.tile == (513, 513) and plan.pad
    with pytest.raises(SegdeployError, match="takes only 513x513"):
        plan_tiles(TileOptions(512), graph_size=(513, 513), processor=Processor((513, 513)))
    assert plan_tiles(TileOptions(64), graph_size=None, processor=Processor(), square_only=True).pad
    with pytest.raises(SegdeployError, match="square"):
        plan_tiles(TileOptions((64, 96)), graph_size=None, processor=Processor(), square_only=True)
    with pytest.raises(SegdeployError, match="multiples of 32"):
        plan_tiles(TileOptions(100), graph_size=None, processor=Processor(pad_divisor=32))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (TileOptions("auto", stride=100, overlap=0.5), "not both"),
        (TileOptions("auto", overlap=1.0), "below 1"),
        (TileOptions("auto", blend="median"), "mean, gaussian"),
        (TileOptions(0), "1..16384"),
        (TileOptions("auto", stride=600), "1 to the tile"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, match):
    with pytest.raises(SegdeployError, match=match):
        plan_tiles(options, graph_size=None, processor=Processor())


def test_auto_needs_a_model_size():
    with pytest.raises(SegdeployError, match="give --tile SIZE"):
        plan_tiles(TileOptions("auto"), graph_size=None, processor=Processor(None))


def test_options_from_the_command_line():
    assert TileOptions.from_text("512x768", "300", None, "gaussian") == TileOptions(
        (512, 768), 300, None, "gaussian"
    )
    assert TileOptions.from_text("AUTO", None, 0.25, "mean").tile == "auto"
    assert not TileOptions.from_text(None, None, None, "mean").enabled
    for args, name in (
        ((None, "64", None, "mean"), "--stride"),
        ((None, None, 0.5, "mean"), "--overlap"),
        ((None, None, None, "gaussian"), "--blend"),
        (("12a", None, None, "mean"), "--tile"),
    ):
        with pytest.raises(SegdeployError, match=name):
            TileOptions.from_text(*args)


def test_padded_windows_equal_the_model_on_the_padded_tile():
    """A fixed-size model tiles an image smaller than its tile by padding the window with
    zeros (after normalising) and using the logits over the image only."""
    run = linear_model(5, 4)
    image = photo(20, 27)
    plan = TilePlan((32, 32), (21, 21), pad=True)
    ours = tiled(image, run, 5, plan)
    x = np.zeros((1, 3, 32, 32), np.float32)
    x[0, :, :20, :27] = prepare(image)
    logits = F.interpolate(torch.from_numpy(run(x)), (32, 32), mode="bilinear", align_corners=False)
    assert (ours == logits[0, :, :20, :27].argmax(0).numpy()).all()


def test_stage_times_are_the_helpers_cpu_and_the_models_wall_time():
    """predict_bands' stages: reading, preparing and blending on the helper thread count
    its CPU time (a source that waits 50 ms per window row adds no CPU), the model and
    the wait for the helper count wall time (a model that sleeps 40 ms per call: all of
    it), as the run's stage table says ("model: wall time, others: CPU time")."""
    import time

    class SlowSource(ArraySource):
        def rows(self, y0, y1):
            time.sleep(0.05)
            return super().rows(y0, y1)

    run = linear_model(4, 4)

    def sleepy(x):
        time.sleep(0.04)
        return run(x)

    image = photo(80, 96, seed=6)
    plan = TilePlan((32, 32), (16, 16), "mean")
    stages = {}
    model = WindowModel(prepare, sleepy, 4)
    bands = list(predict_bands(SlowSource(image), model, plan, 1, stages))
    calls, rows = len(plan.grid(80, 96)), len(plan.grid(80, 96).ys)
    assert sum(len(b) for _, b in bands) == 80
    assert stages["model"] >= 0.04 * calls
    assert stages["decode"] < 0.05 * rows / 2  # slept through, not spent
    assert {"preprocess", "blend", "wait"} <= stages.keys()
