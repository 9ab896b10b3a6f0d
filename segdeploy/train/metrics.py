"""Mean IoU by a streaming confusion matrix (numpy only, torch-free).

Same definition as evaluate's `mean_iou` (huggingface/evaluate,
metrics/mean_iou): pixels whose reference is `ignore_index` are dropped;
per class, IoU = intersection / union and accuracy = intersection / reference
area, NaN where the denominator is 0 (a class absent from both prediction and
reference); means are NaN-means, i.e. over the classes present. Predictions or
references outside 0..num_labels-1 (other than the ignore index) count in no
class, as in evaluate's histogram.

Unlike evaluate, no `reduce_labels` or `label_map` is applied here: references
arrive already reduced by `segdeploy.data.label_array`.

Only a (num_labels+1)^2 matrix is kept, never the predictions, so evaluating
a whole dataset costs constant memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

# Path for `evaluate.load(EVALUATE_MODULE_PATH)`: an evaluate.Metric that wraps MeanIoU.
EVALUATE_MODULE_PATH = str(Path(__file__).with_name("metric_module"))


class MeanIoU:
    """Accumulate (prediction, reference) pairs; `compute()` gives evaluate's mean_iou fields."""

    def __init__(self, num_labels: int, ignore_index: int = 255):
        if int(num_labels) < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = int(num_labels)
        self.ignore_index = int(ignore_index)
        # Row = reference, column = prediction; index num_labels collects values
        # outside the classes, which evaluate's histogram drops.
        self.confusion = np.zeros((self.num_labels + 1, self.num_labels + 1), dtype=np.int64)

    def reset(self) -> None:
        self.confusion[:] = 0

    def update(self, pred: np.ndarray, ref: np.ndarray) -> None:
        """Add one prediction/reference pair (any shape, same shape: HxW, NxHxW...)."""
        pred, ref = np.asarray(pred), np.asarray(ref)
        if pred.shape != ref.shape:
            raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
        keep = ref != self.ignore_index
        n = self.num_labels
        ref = _bucket(ref[keep], n)
        pred = _bucket(pred[keep], n)
        # bincount over a flat (ref, pred) index is the fastest numpy confusion matrix.
        self.confusion += np.bincount(ref * (n + 1) + pred, minlength=(n + 1) ** 2).reshape(
            n + 1, n + 1
        )

    def merge(self, other: MeanIoU) -> None:
        """Add another accumulator's counts (e.g. from another process or shard)."""
        if (other.num_labels, other.ignore_index) != (self.num_labels, self.ignore_index):
            raise ValueError("cannot merge MeanIoU accumulators with different settings")
        self.confusion += other.confusion

    def compute(self) -> dict:
        """mean_iou, mean_accuracy, overall_accuracy (floats, NaN if undefined),
        per_category_iou and per_category_accuracy (lists of num_labels floats, NaN for absent)."""
        n = self.num_labels
        cm = self.confusion.astype(np.float64)
        intersect = np.diag(cm)[:n]
        area_label = cm[:n, :].sum(axis=1)  # reference pixels of each class
        area_pred = cm[:, :n].sum(axis=0)  # predicted pixels of each class
        union = area_pred + area_label - intersect
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN -> NaN
            iou = intersect / union
            acc = intersect / area_label
            overall = intersect.sum() / area_label.sum()
            mean_iou = np.nanmean(iou)
            mean_acc = np.nanmean(acc)
        return {
            "mean_iou": float(mean_iou),
            "mean_accuracy": float(mean_acc),
            "overall_accuracy": float(overall),
            "per_category_iou": iou.tolist(),
            "per_category_accuracy": acc.tolist(),
        }


def _bucket(values: np.ndarray, n: int) -> np.ndarray:
    values = values.astype(np.int64, copy=False).ravel()
    return np.where((values >= 0) & (values < n), values, n)


def finite(x) -> float | None:
    """`x` as a float, or None where it is missing or not finite.

    JSON has no NaN: a class absent from both prediction and reference has no
    IoU, and reports write null for it.
    """
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None
