"""Infer, torch-free: label maps for a folder (the command's job), and one image at a time.

python examples/infer.py [MODEL_DIR] PHOTOS [OUT]    # defaults: models/example, -, masks
"""

import sys
from pathlib import Path

import numpy as np

from segdeploy import Segmenter
from segdeploy.runtime.infer import run_infer


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/example"
    photos = Path(sys.argv[2] if len(sys.argv) > 2 else "models/demo/data/images")
    out = sys.argv[3] if len(sys.argv) > 3 else "masks"

    # The folder job: label PNGs, overlays and summary.json under OUT (what `segdeploy infer` does).
    summary = run_infer([photos], model_dir, out, overlay=True, progress=False)
    print(f"{summary['totals']['images']} images, {summary['totals']['images_per_s']} images/s")

    # One image at a time, in your own code: paths, PIL images or HxWx3 uint8 arrays.
    seg = Segmenter(model_dir)
    first = next(p for p in sorted(photos.iterdir()) if p.suffix.lower() in (".jpg", ".png"))
    mask = seg.predict(first)  # (H, W) class ids at the photo's size
    ids, counts = np.unique(mask, return_counts=True)
    print(first.name, {seg.id2label[int(i)]: int(n) for i, n in zip(ids, counts, strict=True)})


# The guard matters: segdeploy's worker processes import this script again, and a script
# without it would start its whole job in every worker (multiprocessing's rule).
if __name__ == "__main__":
    main()
