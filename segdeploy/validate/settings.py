"""`ValidationSettings`: which data a graph is compared on, how strictly, and where it runs.

The one source of these defaults: `segdeploy validate` and `segdeploy export`
derive their shared Click options from it (segdeploy/cli/options.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ValidationSettings:
    #: Dataset to validate on (a folder, a save_to_disk folder, a Hub id, synthetic[:SIZE]);
    #: None: the dataset that `segdeploy train` recorded.
    dataset: str | None = None
    #: A whole split to validate on; None: the evaluation split train used.
    split: str | None = None
    reduce_labels: bool | None = None
    ignore_index: int | None = None
    id2label_file: str | None = None
    #: At most this many images of the split (the first ones); None: all.
    max_images: int | None = None
    #: Largest allowed change of mean IoU; None: the default of each graph's precision.
    tolerance: float | None = None
    #: Largest max |logit difference| (relative); None: the default of each precision.
    logit_tolerance: float | None = None
    provider: str = "cpu"
    fallback: bool = False
    batch_size: int = 4
    #: Without labelled data: how many random images to compare logits on.
    random_inputs: int = 4
    #: CPU threads for PyTorch and onnxruntime; None: theirs.
    threads: int | None = None
    #: Sliding-window validation (--tile auto|SIZE|HxW, --stride, --overlap, --blend): both
    #: models run segdeploy.runtime.tiles' windows on the images at their own size.
    tile: str | None = None
    stride: str | None = None
    overlap: float | None = None
    blend: str = "mean"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tiling(self):
        """The tile options (segdeploy.runtime.tiles.TileOptions); `.enabled` when --tile."""
        from segdeploy.runtime.tiles import TileOptions

        return TileOptions.from_text(self.tile, self.stride, self.overlap, self.blend)

    def check(self) -> None:
        """SegdeployError for a value no run could use (the CLI's ranges refuse them too)."""
        from segdeploy.errors import SegdeployError

        if self.batch_size < 1:
            raise SegdeployError("--batch-size", "must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise SegdeployError("--threads", "must be at least 1")
        self.tiling  # noqa: B018 (parses the tile options: a bad one is refused here)
        # NaN passes every range check (all its comparisons are false): refused by name,
        # or every comparison with it would pass and the report would hold NaN (not JSON).
        for option, value in (("--tolerance", self.tolerance),
                              ("--logit-tolerance", self.logit_tolerance)):  # fmt: skip
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise SegdeployError(option, f"must be a number >= 0, got {value}")
