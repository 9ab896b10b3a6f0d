"""Evaluation inside the Trainer: labels at the label size on the device, a streaming mean
IoU per evaluation, and the final metrics written to metrics.json."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from segdeploy.train.metrics import MeanIoU, finite
from segdeploy.train.torch_ops import upsample_bilinear

SUMMARY_METRICS = ("mean_iou", "mean_accuracy", "overall_accuracy")


def upsample_argmax(logits, labels):
    """Trainer's preprocess_logits_for_metrics: logits (N,C,h,w) -> class ids at the label size.

    Done on the device, per batch, before the Trainer gathers across processes,
    so only int class maps travel (bilinear, as in the guide and the runtime).
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    return upsample_bilinear(logits, labels.shape[-2:]).argmax(dim=1)


class StreamingMeanIoU:
    """`compute_metrics` for `batch_eval_metrics=True`.

    The Trainer calls it once per eval batch with that batch's predictions
    (already argmax'd by `upsample_argmax`); it folds them into a confusion
    matrix and answers on the last batch, then starts afresh for the next
    evaluation. A class rather than a closure because the Trainer's API is a
    callable with state across calls; `last_result` keeps the full answer
    (per-category values) that the logs only show in summary.
    """

    def __init__(self, num_labels: int, ignore_index: int):
        self._metric = MeanIoU(num_labels, ignore_index)
        self.last_result: dict[str, Any] | None = None

    def __call__(self, eval_pred, compute_result: bool) -> dict[str, float]:
        preds, refs = eval_pred.predictions, eval_pred.label_ids
        self._metric.update(_numpy(preds), _numpy(refs))
        if not compute_result:
            return {}
        result = self._metric.compute()
        self._metric.reset()
        self.last_result = result
        return {k: float(result[k]) for k in SUMMARY_METRICS}


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def final_metrics(metric: StreamingMeanIoU, history, data, step: int) -> dict[str, Any]:
    result = metric.last_result or {}
    eval_loss = next(
        (h["eval_loss"] for h in reversed(history) if "eval_loss" in h and h.get("step") == step),
        None,
    )
    return {
        **{k: finite(result.get(k)) for k in SUMMARY_METRICS},
        "per_category_iou": [finite(v) for v in result.get("per_category_iou", [])],
        "per_category_accuracy": [finite(v) for v in result.get("per_category_accuracy", [])],
        "id2label": {str(k): v for k, v in data.id2label.items()},
        "eval_loss": eval_loss,
        "eval_split": data.spec.eval_split or f"{data.spec.test_size} of {data.spec.split}",
        "eval_samples": len(data.eval),
        "step": step,
    }


def best_mean_iou(history) -> tuple[float | None, int | None]:
    evals = [(h["eval_mean_iou"], h["step"]) for h in history if "eval_mean_iou" in h]
    evals = [(v, s) for v, s in evals if v is not None and math.isfinite(v)]
    if not evals:
        return None, None
    best = max(evals, key=lambda e: (e[0], -e[1]))
    return float(best[0]), int(best[1])
