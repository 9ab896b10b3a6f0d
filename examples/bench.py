"""Bench: segdeploy's ONNX Runtime path against eager PyTorch on a folder of images.

python examples/bench.py [MODEL_DIR] PHOTOS [LABELS]   # LABELS: masks with the same stems
"""

import sys
from pathlib import Path

from segdeploy.bench.run import BenchSettings, InputOptions, bench_model


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/example"
    photos = sys.argv[2] if len(sys.argv) > 2 else "models/demo/data/images"
    labels = sys.argv[3] if len(sys.argv) > 3 else None
    settings = BenchSettings(
        batch_sizes=(4,),
        runs=1,
        model_runs=2,
        targets=False,  # the targets are set for a trained b0 at 512 px
        inputs=InputOptions(images=photos, labels=labels),
    )
    report = bench_model(
        model_dir, settings, backends=["torch", "onnx-cpu"], output=Path(model_dir) / "bench.json"
    )
    for row in report["results"]:
        print(f"{row['backend']}: {row.get('end_to_end_images_per_s', 0):.1f} images/s end to end")


# The guard matters: segdeploy's worker processes import this script again, and a script
if __name__ == "__main__":
    main()
