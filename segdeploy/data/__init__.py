"""Segmentation datasets: the built-in synthetic set, local folders and the Hub.

    from segdeploy.data import DatasetSpec, load_splits, label_array
    data = load_splits(DatasetSpec("/data/camvid", eval_split="val", reduce_labels=False,
                                   ignore_index=11))
    labels = label_array(row["annotation"], reduce_labels=data.spec.reduce_labels,
                         ignore_index=data.spec.ignore_index, num_labels=data.num_labels,
                         where=row["name"])

`DatasetSpec.name` is resolved in this order: "synthetic[:SIZE]"; an existing
folder (a `datasets.save_to_disk` folder, else the ADE20K layout); a name that
is clearly a path ("/", "./", "~", or ending in "/") is reported as a missing
folder; anything else is a Hub dataset id ("owner/name" or "owner/name:config").

Class names: `id2label_file` if given, else id2label.json in the dataset folder
(or the Hub repo). A local folder without one is an error rather than a guess
from the masks: a subset such as train[:50] may miss classes, and a model head
sized from it would silently be wrong.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from segdeploy.data.check import check_dataset, iter_examples
from segdeploy.data.defaults import DEFAULT_TEST_SIZE, decide_reduce_labels, default_eval_split
from segdeploy.data.labels import label_array, read_id2label
from segdeploy.data.spec import DatasetSpec, SegmentationData
from segdeploy.errors import SegdeployError

__all__ = [
    "DatasetSpec",
    "SegmentationData",
    "check_dataset",
    "iter_examples",
    "label_array",
    "load_splits",
    "read_id2label",
]

log = logging.getLogger(__name__)


def load_splits(spec: DatasetSpec, *, need_train: bool = True) -> SegmentationData:
    """Load the train and eval rows that `spec` describes.

    need_train=False skips building the train rows (export and validation only
    need the eval split; with no eval_split, `split` is still loaded to carve it).
    What the spec leaves open is decided from the data (segdeploy.data.defaults):
    the eval split (the dataset's own validation split, else `test_size` of
    `split`) and reduce_labels; `SegmentationData.choices` says why.
    """
    source = _source(spec)
    choices: dict[str, str] = {}
    eval_split = spec.eval_split
    if eval_split is None and spec.test_size is None and source.splits:
        eval_split = default_eval_split(source.splits, spec.split)
        if eval_split is not None:
            choices["eval_split"] = (
                f"{eval_split}: the dataset's own validation split "
                "(--eval-split picks another, --test-size holds out part of --split instead)"
            )
    eval_split = eval_split or source.eval_default
    test_size = spec.test_size
    if eval_split is not None:
        eval_ds = source.get(eval_split, "--eval-split")
        train_ds = source.get(spec.split, "--split") if need_train else None
    else:
        test_size = DEFAULT_TEST_SIZE if test_size is None else test_size
        whole = source.get(spec.split, "--split")
        try:
            parts = whole.train_test_split(test_size=test_size, seed=spec.seed)
        except ValueError as err:
            raise SegdeployError(
                "--test-size", f"cannot hold out {test_size} of {len(whole)} rows: {err}"
            ) from None
        train_ds = parts["train"] if need_train else None
        eval_ds = parts["test"]

    id2label = read_id2label(spec.id2label_file) if spec.id2label_file else source.id2label()
    reduce_labels = spec.reduce_labels
    if reduce_labels is None and source.reduce_default is not None:
        reduce_labels = source.reduce_default
    elif reduce_labels is None:
        scanned = train_ds if train_ds is not None else eval_ds
        reduce_labels, why = decide_reduce_labels(
            scanned, id2label, spec.ignore_index, name=source.name
        )
        choices["reduce_labels"] = f"{'on' if reduce_labels else 'off'}: {why}"
    for option, why in choices.items():
        log.info("%s %s", option, why)
    resolved = dataclasses.replace(
        spec,
        name=source.name,
        eval_split=eval_split,
        test_size=None if eval_split is not None else test_size,
        reduce_labels=reduce_labels,
    )
    return SegmentationData(
        train=train_ds, eval=eval_ds, id2label=id2label, spec=resolved, choices=choices
    )


@dataclasses.dataclass
class _Source:
    """One kind of dataset: how to read a split, its class names and its defaults."""

    name: str  # as recorded: local folders absolute
    get: Callable[[str, str], Any]  # (split expression, option) -> datasets.Dataset
    id2label: Callable[[], dict[int, str]]
    reduce_default: bool | None = None  # None: decided from the masks
    eval_default: str | None = None  # a split that is always the eval split
    splits: Sequence[str] = ()  # split names known without a network


def _source(spec: DatasetSpec) -> _Source:
    from segdeploy.data import builtin, disk, folder, hub

    name = spec.name
    path = Path(name).expanduser()
    if builtin.is_synthetic(name):
        builtin.synthetic_image_size(name)  # validate the size before anything else

        def synthetic_id2label():
            from segdeploy.data.synthetic import ID2LABEL

            return dict(ID2LABEL)

        return _Source(
            name,
            lambda expr, option: builtin.synthetic_split(name, expr, option=option),
            synthetic_id2label,
            reduce_default=False,
            eval_default="validation",
        )
    if path.exists():
        root = path.resolve()
        if not root.is_dir():
            raise SegdeployError(root, "not a folder; expected a dataset folder")
        if disk.is_saved_dataset(root):
            saved = disk.load_saved(root)
            return _Source(
                str(root),
                lambda expr, option: disk.saved_split(saved, root, expr, option=option),
                lambda: _folder_id2label(root),
                splits=list(saved),
            )
        if folder.is_ade_folder(root):
            return _Source(
                str(root),
                lambda expr, option: folder.folder_split(root, expr, option=option),
                lambda: _folder_id2label(root),
                splits=folder.folder_split_names(root),
            )
        if not any(root.iterdir()):
            raise SegdeployError(root, "folder is empty")
        raise SegdeployError(
            root,
            "not a dataset folder: expected images/<split>/ and annotations/<split>/ "
            "(ADE20K layout) or a folder written by datasets.save_to_disk",
        )
    if _looks_like_path(name):
        raise SegdeployError(name, "folder not found")
    # The Hub: its split names would cost a network round trip, so --eval-split names one.
    return _Source(
        name,
        lambda expr, option: hub.hub_split(name, expr, option=option),
        lambda: hub.hub_id2label(name),
    )


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~", "\\")) or name.endswith(("/", "\\")) or name.count("/") > 1
    )


def _folder_id2label(root: Path) -> dict[int, str]:
    candidate = root / "id2label.json"
    if candidate.is_file():
        return read_id2label(candidate)
    raise SegdeployError(
        root,
        'no id2label.json in this folder; add one or pass --id2label FILE ({"0": "class name", ...})',
    )
