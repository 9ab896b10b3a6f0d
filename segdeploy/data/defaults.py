"""What a dataset decides when the user does not: `reduce_labels` and the evaluation split.

Both used to be fixed defaults (reduce on, 20% of train held out) that a user's
own data fell into silently: a folder whose masks use 0 for a real class lost
that class and had every name shifted by one, and its own validation split was
ignored. Now each is decided from the data, and the reason is kept
(`SegmentationData.choices`), logged and recorded in train_args.json.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segdeploy.data.labels import mask_values
from segdeploy.data.splits import split_names

# Names a dataset's held-out split goes by, in the order they are preferred.
VALIDATION_SPLITS = ("validation", "val", "valid")
# Datasets whose convention is known without looking: the guide's ADE20K, 0 = "other".
KNOWN_REDUCE_LABELS = {"scene_parse_150": True}
# Masks read to decide reduce_labels, spread evenly over the split: enough to see
# every class value of a real dataset, a second or two of decoding.
SCAN_LIMIT = 400
DEFAULT_TEST_SIZE = 0.2


def default_eval_split(available: Sequence[str], train_expr: str) -> str | None:
    """The dataset's own validation split, unless --split already trains on it."""
    used = set(split_names(train_expr))
    for name in VALIDATION_SPLITS:
        if name in available and name not in used:
            return name
    return None


def decide_reduce_labels(
    ds, id2label: dict[int, str], ignore_index: int, *, name: str
) -> tuple[bool, str]:
    """(reduce_labels, why) from the mask values of `ds` (rows with an "annotation" column).

    Reduction (0 is "other" and ignored, v becomes class v - 1) is the only reading
    under which a mask value equal to the number of classes is valid, so such a
    value turns it on. Masks whose values all fit the classes of id2label keep 0
    as class 0: reducing them would silently drop a real class.
    """
    repo = name.partition(":")[0]
    if repo in KNOWN_REDUCE_LABELS:
        return KNOWN_REDUCE_LABELS[repo], f"{repo}'s convention (0 is 'other')"
    n = len(id2label)
    values = _mask_values(ds)
    meaningful = values[(values != 255) & (values != ignore_index)]
    seen = f"{len(ds) if len(ds) <= SCAN_LIMIT else SCAN_LIMIT} masks"
    if meaningful.size == 0:
        return False, f"{seen} hold no class values, only 255/ignore"
    top = int(meaningful.max())
    if top == n:
        return True, (
            f"{seen} hold value {n}, one past the {n} classes of id2label: 0 is 'other' "
            "(ignored) and v is class v-1, the ADE20K convention"
        )
    if top > n:
        return False, f"{seen} hold values up to {top}, past the {n} classes either way"
    lowest = int(meaningful.min())
    zero = f"0 is class 0 ({id2label[0]!r})" if lowest == 0 else "no mask uses 0"
    return False, (
        f"{seen} hold values {lowest}..{top}, within the {n} classes of id2label, so {zero}; "
        "pass --reduce-labels if 0 means 'other' as in ADE20K"
    )


def _mask_values(ds) -> np.ndarray:
    """The distinct raw values of up to SCAN_LIMIT masks, spread evenly over `ds`."""
    from segdeploy.data.check import decode_annotation, undecoded

    rows = undecoded(ds)
    picks = np.unique(np.linspace(0, len(rows) - 1, min(len(rows), SCAN_LIMIT)).astype(int))
    seen = np.zeros(0, np.int64)
    for i in picks.tolist():
        row = rows[i]
        raw = mask_values(decode_annotation(row), where=row["name"]).ravel()
        seen = np.union1d(seen, np.unique(raw))
    return seen
