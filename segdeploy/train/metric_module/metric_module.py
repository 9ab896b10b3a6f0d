"""segdeploy's mean IoU as an `evaluate` metric, loadable offline:

    import evaluate
    from segdeploy.train.metrics import EVALUATE_MODULE_PATH
    metric = evaluate.load(EVALUATE_MODULE_PATH)
    metric.compute(predictions=[...], references=[...], num_labels=5, ignore_index=255)

Same inputs and outputs as evaluate's `mean_iou`, computed by
`segdeploy.train.metrics.MeanIoU`. References must already be reduced (see
`segdeploy.data.label_array`), so `reduce_labels=True` is refused rather than
applied a second time. `evaluate` keeps every added map in its Arrow cache
until compute(); for constant memory over a large set, use MeanIoU directly.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from segdeploy.train.metrics import MeanIoU

_DESCRIPTION = """Mean Intersection-over-Union over the classes present, from a streaming confusion
matrix; equal to evaluate's mean_iou with reduce_labels=False."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted label maps (2-D integer arrays, any size).
    references: list of reference label maps, same sizes as the predictions.
    num_labels (int): number of classes.
    ignore_index (int, default 255): reference value to skip.
    nan_to_num (float, optional): replace NaN results (absent classes) by this value.
Returns:
    mean_iou, mean_accuracy, overall_accuracy (float),
    per_category_iou, per_category_accuracy (ndarray of shape (num_labels,)).
"""


class SegdeployMeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int = 255,
        nan_to_num: float | None = None,
        reduce_labels: bool = False,
    ):
        if reduce_labels:
            raise ValueError(
                "reduce_labels=True is not supported: pass references already reduced "
                "(segdeploy.data.label_array does it)"
            )
        metric = MeanIoU(num_labels, ignore_index)
        for pred, ref in zip(predictions, references, strict=True):
            metric.update(np.asarray(pred), np.asarray(ref))
        result = metric.compute()
        out = {
            key: np.asarray(value) if isinstance(value, list) else value
            for key, value in result.items()
        }
        if nan_to_num is not None:
            out = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in out.items()}
        return out
