"""Charts as PNG files: the training curves beside a trained model, and the one way
segdeploy draws with matplotlib (the bench chart uses `figure` and `save_png` too).

matplotlib's object API with the Agg canvas rather than pyplot: no global backend
or figure state is touched (safe on headless machines and inside other programs).
"""

from __future__ import annotations

import os
from typing import Any

from segdeploy.atomic import atomic_path


def plot_training_curves(log_history: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss (train and eval) and eval mean IoU over steps, from `Trainer.state.log_history`."""

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        return [s for s, _ in pts], [v for _, v in pts]

    fig = figure((10, 4), layout="constrained")
    loss_ax, iou_ax = fig.subplots(1, 2)
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        steps, values = series(key)
        if steps:
            loss_ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=label)
    loss_ax.set(xlabel="step", ylabel="loss", title="Loss")
    if loss_ax.lines:
        loss_ax.legend(loc="upper right")
    loss_ax.grid(alpha=0.3)
    steps, values = series("eval_mean_iou")
    if steps:
        iou_ax.plot(steps, values, marker="o", color="tab:green", label="eval mean IoU")
        iou_ax.legend(loc="lower right")
    iou_ax.set(xlabel="step", ylabel="mean IoU", title="Mean IoU", ylim=(0, 1))
    iou_ax.grid(alpha=0.3)
    save_png(fig, path, dpi=100)


def figure(figsize: tuple[float, float], **options: Any):
    """A matplotlib Figure on its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, **options)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """`fig` as a PNG at `path`, written atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
