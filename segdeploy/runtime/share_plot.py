"""A clip's `classes.png` (its class shares over time, stacked), drawn beside the run.

matplotlib's import (0.69 s on the 2-core AVX2 EPYC) and its first figure
(0.29 s) cost a clip of CamVid's 480x360 frames as much as ~150 frames of the
tiny model, and they were paid in the process that runs the model, after the
clip's last frame. `SharePlots` moves them off that path: one process (from
the pipeline's fork server) started when a run meets its first clip imports
matplotlib and draws a first figure while frames are segmented, then draws
each clip's plot when the clip's shares are complete. The run waits for the
plots (`wait`) before it writes their clips' summary.json and reports; a run
without clips never starts it, so it never imports matplotlib.

What is sent is small: the shares binned over time (`share_series`, at most
`BINS` rows however long the clip), computed from the clip's journal in the
caller.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segdeploy.atomic import atomic_path
from segdeploy.errors import first_line
from segdeploy.runtime.lifeline import tied_pool
from segdeploy.runtime.pipeline import start_forkserver

log = logging.getLogger(__name__)

#: Time bins of a plot: a long clip plots the mean share per bin, in constant memory.
BINS = 600


@dataclass(frozen=True)
class ShareSeries:
    """What one clip's plot shows: per time bin with frames, the mean share of each class
    present anywhere in the clip."""

    centres: np.ndarray  # seconds, one per bin
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
        centres=((edges[:-1] + edges[1:]) / 2)[keep],
        means=mean[:, present],
        labels=[id2label.get(i, str(i)) for i in present],
        colours=palette_for(n)[present] / 255.0,
        title=title,
    )


def draw_shares(series: ShareSeries, dest: Path) -> None:
    """The stacked shares as a PNG at `dest`, written atomically."""
    fig = _figure(series)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")


def _figure(series: ShareSeries, size: tuple[float, float] = (8, 3.5), dpi: int = 100):
    """The stacked shares on a matplotlib Figure (the object API on an Agg canvas: no
    pyplot state; segdeploy.train.plots does the same, but importing it imports the
    training package, torch included)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    c = series.centres
    ax.stackplot(c, series.means.T, labels=series.labels, colors=series.colours)
    ax.set_xlim(c[0], c[-1] if len(c) > 1 else c[0] + 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("share of pixels")
    ax.set_title(series.title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return fig


#: A one-class series the plot process draws at start (`_init_plotter`).
_WARM_UP = ShareSeries(
    centres=np.array([0.0, 1.0]),
    means=np.array([[0.5], [0.5]]),
    labels=["warm-up"],
    colours=np.array([[0.5, 0.5, 0.5]]),
    title="warm-up",
)


def _init_plotter() -> None:
    """The plot process (a killed run ends it too: `tied_pool`): Ctrl-C is the run's to
    handle (it waits for the plot in flight); matplotlib is imported and a first figure
    drawn (fonts, text layout) now, while the run segments frames, so that a clip's plot
    costs only its own drawing."""
    import io

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _figure(_WARM_UP, size=(2, 1), dpi=50).savefig(io.BytesIO(), format="png")


class SharePlots:
    """The plot process of one run and the plots in flight (see the module's docstring).

    `draw` returns at once; `then(error)` runs in the caller's thread, from `poll` or
    `wait`, when the plot is written (error None) or failed (error: one line, already
    logged as `PATH: cannot draw the class-share plot: ...`)."""

    def __init__(self):
        self._ex: ProcessPoolExecutor | None = None
        self._pending: list[tuple[Future, Path, Callable[[str | None], None]]] = []

    def start(self) -> None:
        """Start the plot process (once): it imports matplotlib while the run goes on."""
        if self._ex is None:
            self._ex = tied_pool(1, start_forkserver(), _init_plotter)
            self._ex.submit(int)  # spawn it now, not at the first plot

    def draw(self, series: ShareSeries, dest: Path, then: Callable[[str | None], None]) -> None:
        self.start()
        self._pending.append((self._ex.submit(draw_shares, series, dest), dest, then))

    def poll(self) -> None:
        """Hand on the plots finished so far (in the order they were asked for)."""
        while self._pending and self._pending[0][0].done():
            self._settle(*self._pending.pop(0))

    def wait(self) -> None:
        """Every plot asked for, written or failed; then its `then`."""
        while self._pending:
            self._settle(*self._pending.pop(0))

    def _settle(self, fut: Future, dest: Path, then: Callable[[str | None], None]) -> None:
        try:
            fut.result()
            error = None
        except Exception as err:  # matplotlib's, an OS error, or the process dying
            error = f"cannot draw the class-share plot: {type(err).__name__}: {first_line(err)}"
            log.error("%s: %s", dest, error)
        then(error)

    def close(self) -> None:
        """Stop the plot process; plots not waited for are left undone (an interrupted run)."""
        for fut, _, _ in self._pending:
            fut.cancel()
        self._pending.clear()
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None
