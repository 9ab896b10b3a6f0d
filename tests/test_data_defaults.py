"""Defaults that do not trap (issue 23): reduce_labels and the eval split decided from the data.

A folder whose masks use 0 for a real class used to be reduced (class 0 ignored,
every name shifted by one, mean IoU inflated), and its own validation split was
ignored for 20% of train.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.data import DatasetSpec, load_splits
from segdeploy.data.defaults import SCAN_LIMIT, default_eval_split
from segdeploy.data.synthetic import ID2LABEL, write_synthetic_folder


@pytest.fixture
def real_zero(tmp_path) -> Path:
    """Masks 0..4 with id2label naming class 0 ("background"); train 6, validation 3."""
    return write_synthetic_folder(tmp_path / "own", n_train=6, n_val=3, seed=0, size=32)


def _ade_convention(root: Path, n_classes: int = 4) -> Path:
    """Masks 0..n with 0 = 'other' and id2label of n classes (ADE20K's convention)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
                root / "images" / split / f"{i}.png"
            )
            mask = rng.integers(0, n_classes + 1, (16, 16)).astype(np.uint8)
            Image.fromarray(mask).save(root / "annotations" / split / f"{i}.png")
    names = {str(i): f"class{i}" for i in range(n_classes)}
    (root / "id2label.json").write_text(json.dumps(names))
    return root


def test_a_real_class_0_is_not_reduced_and_the_own_validation_split_is_used(real_zero):
    data = load_splits(DatasetSpec(str(real_zero)))
    assert data.spec.reduce_labels is False
    assert data.choices["reduce_labels"].startswith("off: 6 masks hold values 0..4")
    assert "0 is class 0 ('background')" in data.choices["reduce_labels"]
    # The folder's own images/validation/, not a fifth of train.
    assert data.spec.eval_split == "validation" and data.spec.test_size is None
    assert "own validation split" in data.choices["eval_split"]
    val = sorted(str(p) for p in (real_zero / "annotations" / "validation").glob("*.png"))
    assert sorted(data.eval["name"]) == val and len(data.train) == 6
    # The labels train and validate read are the masks' values: class 0 is counted.
    from segdeploy.data import iter_examples

    _, labels, name = next(iter_examples(data, "train"))
    np.testing.assert_array_equal(labels, np.asarray(Image.open(name)))


def test_masks_one_past_the_classes_are_reduced(tmp_path):
    root = _ade_convention(tmp_path / "ade")
    data = load_splits(DatasetSpec(str(root)))
    assert data.spec.reduce_labels is True and "hold value 4" in data.choices["reduce_labels"]
    assert data.spec.eval_split == "val"  # "val" counts as the validation split too


def test_given_options_win_over_the_data(real_zero):
    data = load_splits(DatasetSpec(str(real_zero), reduce_labels=True, eval_split="train[:2]"))
    assert data.spec.reduce_labels is True and data.choices == {}
    held_out = load_splits(DatasetSpec(str(real_zero), test_size=0.5))
    assert held_out.spec.eval_split is None and held_out.spec.test_size == 0.5
    assert len(held_out.train) == len(held_out.eval) == 3 and "eval_split" not in held_out.choices
    # A dataset without a validation split holds out 0.2 of train, as before.
    (real_zero / "images" / "validation").rename(real_zero / "images" / "holdout")
    carved = load_splits(DatasetSpec(str(real_zero), split="train"))
    assert carved.spec.eval_split is None and carved.spec.test_size == 0.2
    assert (len(carved.train), len(carved.eval)) == (4, 2)


def test_training_on_the_validation_split_does_not_evaluate_on_it():
    assert default_eval_split(["train", "validation"], "train") == "validation"
    assert default_eval_split(["train", "validation"], "train+validation") is None
    assert default_eval_split(["train", "val", "validation"], "train[:10]") == "validation"
    assert default_eval_split(["train", "test"], "train") is None


def test_the_decision_reads_a_bounded_sample(real_zero, monkeypatch):
    import segdeploy.data.defaults as defaults

    monkeypatch.setattr(defaults, "SCAN_LIMIT", 2)
    data = load_splits(DatasetSpec(str(real_zero)))
    assert data.choices["reduce_labels"].startswith("off: 2 masks hold")
    assert SCAN_LIMIT >= 100


def test_recorded_spec_rebuilds_the_same_split(real_zero):
    data = load_splits(DatasetSpec(str(real_zero)))
    again = load_splits(DatasetSpec.from_dict(data.spec.to_dict()))
    assert again.spec == data.spec and list(again.eval["name"]) == list(data.eval["name"])
    assert again.choices == {}  # nothing left to decide


def test_train_prints_and_records_the_choices(real_zero, tmp_path, caplog):
    from segdeploy.cli import main

    out = tmp_path / "m"
    args = ["train", "--model", "scratch:tiny", "--dataset", str(real_zero), "--image-size", "32"]
    args += ["--max-steps", "1", "--eval-steps", "1", "-o", str(out)]
    with caplog.at_level(logging.INFO, logger="segdeploy.data"):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    logged = caplog.text
    assert "reduce_labels off: 6 masks hold values 0..4" in logged
    assert "eval_split validation: the dataset's own validation split" in logged
    recorded = json.loads((out / "train_args.json").read_text())
    assert recorded["dataset"]["reduce_labels"] is False
    assert recorded["dataset"]["eval_split"] == "validation"
    assert recorded["dataset_choices"]["reduce_labels"].startswith("off:")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_samples"] == 3  # the 3 validation images
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(k): v for k, v in ID2LABEL.items()}
