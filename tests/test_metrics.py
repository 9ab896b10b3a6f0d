"""segdeploy.train.metrics.MeanIoU against a per-class numpy reference, and the evaluate module."""

from __future__ import annotations

import numpy as np
import pytest

from segdeploy.train.metrics import EVALUATE_MODULE_PATH, MeanIoU


def reference_mean_iou(preds, refs, num_labels, ignore_index):
    """evaluate's mean_iou definition written out class by class, independent of MeanIoU."""
    inter = np.zeros(num_labels)
    area_pred = np.zeros(num_labels)
    area_ref = np.zeros(num_labels)
    for pred, ref in zip(preds, refs, strict=True):
        keep = ref != ignore_index
        p, r = pred[keep], ref[keep]
        for c in range(num_labels):
            inter[c] += np.sum((p == c) & (r == c))
            area_pred[c] += np.sum(p == c)
            area_ref[c] += np.sum(r == c)
    iou = [
        inter[c] / (area_pred[c] + area_ref[c] - inter[c])
        if area_pred[c] + area_ref[c] - inter[c]
        else np.nan
        for c in range(num_labels)
    ]
    acc = [inter[c] / area_ref[c] if area_ref[c] else np.nan for c in range(num_labels)]
    present = [v for v in iou if not np.isnan(v)]
    present_acc = [v for v in acc if not np.isnan(v)]
    return {
        "mean_iou": sum(present) / len(present) if present else np.nan,
        "mean_accuracy": sum(present_acc) / len(present_acc) if present_acc else np.nan,
        "overall_accuracy": inter.sum() / area_ref.sum() if area_ref.sum() else np.nan,
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }


def random_maps(rng, n_maps, num_labels, *, classes=None, ignore=None, ignore_frac=0.0):
    """Prediction/reference pairs of varying sizes; `classes` limits the values used."""
    values = np.arange(num_labels) if classes is None else np.asarray(classes)
    preds, refs = [], []
    for _ in range(n_maps):
        shape = (int(rng.integers(3, 40)), int(rng.integers(3, 40)))
        ref = rng.choice(values, size=shape)
        # Predictions agree with the reference often enough to give non-trivial IoUs.
        pred = np.where(rng.random(shape) < 0.6, ref, rng.choice(values, size=shape))
        if ignore is not None:
            ref = np.where(rng.random(shape) < ignore_frac, ignore, ref)
        preds.append(pred)
        refs.append(ref)
    return preds, refs


def assert_same(got, want):
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, equal_nan=True, err_msg=key)
    for key in ("per_category_iou", "per_category_accuracy"):
        np.testing.assert_allclose(
            np.asarray(got[key], dtype=float),
            np.asarray(want[key], dtype=float),
            rtol=1e-12,
            equal_nan=True,
            err_msg=key,
        )


def run(preds, refs, num_labels, ignore_index):
    metric = MeanIoU(num_labels, ignore_index)
    for pred, ref in zip(preds, refs, strict=True):
        metric.update(pred, ref)
    return metric.compute()


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_without_ignored_pixels(seed):
    rng = np.random.default_rng(seed)
    preds, refs = random_maps(rng, 6, num_labels=7)
    assert_same(run(preds, refs, 7, 255), reference_mean_iou(preds, refs, 7, 255))


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_with_ignore_index(seed):
    rng = np.random.default_rng(100 + seed)
    preds, refs = random_maps(rng, 6, num_labels=6, ignore=255, ignore_frac=0.3)
    got = run(preds, refs, 6, 255)
    assert_same(got, reference_mean_iou(preds, refs, 6, 255))
    # Ignoring must matter: predictions on the 255 pixels would otherwise widen the unions.
    assert got["mean_iou"] > run(preds, refs, 6, 254)["mean_iou"]


def test_ignore_index_inside_the_class_range():
    # CamVid: 11 classes 0..10, void = 11; and a dataset that ignores a real class id.
    rng = np.random.default_rng(7)
    preds, refs = random_maps(rng, 5, num_labels=12)
    assert_same(run(preds, refs, 11, 11), reference_mean_iou(preds, refs, 11, 11))
    assert_same(run(preds, refs, 12, 3), reference_mean_iou(preds, refs, 12, 3))


def test_absent_classes_are_nan_and_left_out_of_the_means():
    rng = np.random.default_rng(3)
    preds, refs = random_maps(rng, 4, num_labels=8, classes=[0, 2, 5], ignore=255, ignore_frac=0.1)
    got = run(preds, refs, 8, 255)
    assert_same(got, reference_mean_iou(preds, refs, 8, 255))
    iou = np.asarray(got["per_category_iou"])
    assert np.isnan(iou[[1, 3, 4, 6, 7]]).all() and not np.isnan(iou[[0, 2, 5]]).any()
    assert got["mean_iou"] == pytest.approx(np.mean(iou[[0, 2, 5]]))


def test_class_only_predicted_counts_in_the_mean():
    pred = np.array([[0, 1], [1, 1]])
    ref = np.array([[0, 0], [0, 0]])
    got = run([pred], [ref], 3, 255)
    assert_same(got, reference_mean_iou([pred], [ref], 3, 255))
    assert got["per_category_iou"][1] == 0.0  # present in prediction only: IoU 0, not NaN
    assert np.isnan(got["per_category_accuracy"][1])


def test_out_of_range_predictions_count_as_wrong():
    rng = np.random.default_rng(11)
    preds, refs = random_maps(rng, 3, num_labels=4)
    preds = [np.where(rng.random(p.shape) < 0.2, 9, p) for p in preds]
    assert_same(run(preds, refs, 4, 255), reference_mean_iou(preds, refs, 4, 255))


def test_everything_ignored_gives_nan():
    ref = np.full((4, 4), 255)
    got = run([np.zeros((4, 4), int)], [ref], 3, 255)
    assert np.isnan(got["mean_iou"]) and np.isnan(got["overall_accuracy"])


def test_streaming_in_chunks_equals_one_shot():
    rng = np.random.default_rng(5)
    pred = rng.integers(0, 5, size=(8, 32, 32))
    ref = np.where(rng.random((8, 32, 32)) < 0.1, 255, rng.integers(0, 5, size=(8, 32, 32)))
    one_shot = MeanIoU(5)
    one_shot.update(pred, ref)
    chunked = MeanIoU(5)
    for i in range(0, 8, 3):
        chunked.update(pred[i : i + 3], ref[i : i + 3])
    pixelwise = MeanIoU(5)
    for p, r in zip(pred.ravel()[::97], ref.ravel()[::97], strict=True):
        pixelwise.update(np.array([p]), np.array([r]))
    assert chunked.compute() == one_shot.compute()
    np.testing.assert_array_equal(chunked.confusion, one_shot.confusion)
    merged = MeanIoU(5)
    halves = [MeanIoU(5), MeanIoU(5)]
    halves[0].update(pred[:4], ref[:4])
    halves[1].update(pred[4:], ref[4:])
    for h in halves:
        merged.merge(h)
    assert merged.compute() == one_shot.compute()
    assert_same(
        pixelwise.compute(),
        reference_mean_iou([pred.ravel()[::97]], [ref.ravel()[::97]], 5, 255),
    )


def test_state_does_not_grow_with_the_data():
    metric = MeanIoU(4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        metric.update(rng.integers(0, 4, (64, 64)), rng.integers(0, 4, (64, 64)))
    assert metric.confusion.shape == (5, 5)
    assert metric.confusion.sum() == 20 * 64 * 64
    assert set(vars(metric)) == {"num_labels", "ignore_index", "confusion"}


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        MeanIoU(3).update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_evaluate_load_works_offline_and_agrees(monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(EVALUATE_MODULE_PATH)
    rng = np.random.default_rng(9)
    preds, refs = random_maps(rng, 4, num_labels=5, classes=[0, 1, 3], ignore=255, ignore_frac=0.2)
    for i in range(0, 4, 2):
        metric.add_batch(predictions=preds[i : i + 2], references=refs[i : i + 2])
    got = metric.compute(num_labels=5, ignore_index=255)
    assert_same(got, reference_mean_iou(preds, refs, 5, 255))
    filled = metric.compute(predictions=preds, references=refs, num_labels=5, nan_to_num=0)
    assert filled["per_category_iou"][2] == 0 and not np.isnan(filled["per_category_iou"]).any()
    with pytest.raises(ValueError, match="reduce_labels"):
        metric.compute(predictions=preds, references=refs, num_labels=5, reduce_labels=True)
