"""What to load (`DatasetSpec`) and what comes back (`SegmentationData`).

`DatasetSpec` is the JSON-safe description that `segdeploy train` records in
train_args.json, so that `export` rebuilds the very same evaluation split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from segdeploy.errors import SegdeployError

if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class DatasetSpec:
    """Which data to train and evaluate on.

    name: "synthetic" (or "synthetic:SIZE", e.g. "synthetic:64" for SIZExSIZE
        samples instead of 256x256), a local folder in the ADE20K layout, a
        folder written by `datasets.save_to_disk`, or a Hub dataset id.
    split: split expression in the `datasets` syntax: "train", "train[:50]",
        "train[10:20]", "train[:10%]", "train+validation".
    eval_split: evaluate on this split expression; None uses the dataset's own
        validation split ("validation", "val" or "valid" of a local or
        save_to_disk folder; always for "synthetic") unless `test_size` is
        given, else carves `test_size` out of `split` with a seeded
        `train_test_split` (the Hugging Face guide's recipe).
    test_size: fraction of `split` held out when there is no eval split; None
        means 0.2 where the dataset has no validation split of its own.
    reduce_labels: the ADE20K convention (0 is "other" and becomes ignore_index,
        every other value v becomes v - 1; raw 255 stays 255). None decides from
        the masks (segdeploy.data.defaults.decide_reduce_labels): on only when a
        mask value equals the number of classes, which only reduction makes valid;
        False for synthetic, True for scene_parse_150.
    ignore_index: label value (after reduction) that loss and metric skip.
    id2label_file: JSON object {"0": "name", ...}; else id2label.json beside the data.
    """

    name: str
    split: str = "train"
    eval_split: str | None = None
    test_size: float | None = None
    seed: int = 42
    reduce_labels: bool | None = None
    ignore_index: int = 255
    id2label_file: str | None = None

    def __post_init__(self) -> None:
        # Validate at construction so a bad option fails before any data is read.
        if not isinstance(self.name, str) or not self.name.strip():
            raise SegdeployError("--dataset", "must name a dataset")
        if (
            isinstance(self.ignore_index, bool)
            or not isinstance(self.ignore_index, int)
            or not 0 <= self.ignore_index <= 255
        ):
            raise SegdeployError(
                "--ignore-index", f"must be an integer in 0..255, got {self.ignore_index!r}"
            )
        if self.test_size is not None and (
            isinstance(self.test_size, bool)
            or not isinstance(self.test_size, (int, float))
            or not 0.0 < float(self.test_size) < 1.0
        ):
            raise SegdeployError(
                "--test-size", f"must be a fraction between 0 and 1, got {self.test_size!r}"
            )
        if self.reduce_labels not in (None, True, False):
            raise SegdeployError(
                "--reduce-labels", f"must be true, false or unset, got {self.reduce_labels!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSpec:
        if not isinstance(d, dict) or "name" not in d:
            raise SegdeployError("dataset", f"not a dataset description: {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SegdeployError("dataset", f"unknown dataset fields: {', '.join(unknown)}")
        return cls(**d)


@dataclass
class SegmentationData:
    """Train and evaluation rows plus the class names.

    Columns of both datasets: "image" (PIL RGB), "annotation" (single-channel
    PIL label map, mode L or P, raw values: pass it through `label_array`),
    "name" (str: the mask file for local folders, a row id otherwise; use it as
    `where` in error messages).
    """

    train: datasets.Dataset | None
    eval: datasets.Dataset
    id2label: dict[int, str]
    spec: DatasetSpec  # resolved: reduce_labels is a bool, eval_split set where the dataset has one
    # What was decided from the data, and why ({"reduce_labels": "off: ...", "eval_split": ...}).
    choices: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)
