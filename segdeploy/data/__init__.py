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
from pathlib import Path

from segdeploy.data.check import check_dataset, iter_examples
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


def load_splits(spec: DatasetSpec, *, need_train: bool = True) -> SegmentationData:
    """Load the train and eval rows that `spec` describes.

    need_train=False skips building the train rows (export and validation only
    need the eval split; with no eval_split, `split` is still loaded to carve it).
    """
    from segdeploy.data import builtin, disk, folder, hub

    name = spec.name
    path = Path(name).expanduser()
    if builtin.is_synthetic(name):
        default_reduce, eval_default = False, "validation"
        builtin.synthetic_image_size(name)  # validate the size before anything else

        def get(expr, option):
            return builtin.synthetic_split(name, expr, option=option)

        def default_id2label():
            from segdeploy.data.synthetic import ID2LABEL

            return dict(ID2LABEL)

    elif path.exists():
        root = path.resolve()
        name = str(root)
        default_reduce, eval_default = True, None
        if not root.is_dir():
            raise SegdeployError(root, "not a folder; expected a dataset folder")
        if disk.is_saved_dataset(root):
            saved = disk.load_saved(root)

            def get(expr, option):
                return disk.saved_split(saved, root, expr, option=option)

            def default_id2label():
                return _folder_id2label(root)

        elif folder.is_ade_folder(root):

            def get(expr, option):
                return folder.folder_split(root, expr, option=option)

            def default_id2label():
                return _folder_id2label(root)

        elif not any(root.iterdir()):
            raise SegdeployError(root, "folder is empty")
        else:
            raise SegdeployError(
                root,
                "not a dataset folder: expected images/<split>/ and annotations/<split>/ "
                "(ADE20K layout) or a folder written by datasets.save_to_disk",
            )
    elif _looks_like_path(name):
        raise SegdeployError(name, "folder not found")
    else:
        default_reduce, eval_default = True, None

        def get(expr, option):
            return hub.hub_split(name, expr, option=option)

        def default_id2label():
            return hub.hub_id2label(name)

    eval_split = spec.eval_split or eval_default
    if eval_split is not None:
        eval_ds = get(eval_split, "--eval-split")
        train_ds = get(spec.split, "--split") if need_train else None
    else:
        whole = get(spec.split, "--split")
        try:
            parts = whole.train_test_split(test_size=spec.test_size, seed=spec.seed)
        except ValueError as err:
            raise SegdeployError(
                "--test-size", f"cannot hold out {spec.test_size} of {len(whole)} rows: {err}"
            ) from None
        train_ds = parts["train"] if need_train else None
        eval_ds = parts["test"]

    id2label = read_id2label(spec.id2label_file) if spec.id2label_file else default_id2label()
    resolved = dataclasses.replace(
        spec,
        name=name,
        eval_split=eval_split,
        reduce_labels=default_reduce if spec.reduce_labels is None else spec.reduce_labels,
    )
    return SegmentationData(train=train_ds, eval=eval_ds, id2label=id2label, spec=resolved)


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
