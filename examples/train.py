"""Train: a small SegFormer on the built-in synthetic shapes, offline, in about a minute.

    python examples/train.py [MODEL_DIR] [DATASET]     # defaults: models/example, synthetic:64

DATASET may be your folder (images/<split>/ + annotations/<split>/ + id2label.json).
"""

import sys

from segdeploy.data import DatasetSpec
from segdeploy.train import TrainConfig, train


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "models/example"
    dataset = sys.argv[2] if len(sys.argv) > 2 else "synthetic:64"
    config = TrainConfig(
        model="scratch:tiny",  # random weights, offline; "nvidia/mit-b0" with the Hub
        dataset=DatasetSpec(dataset),  # eval split and reduce_labels decided from the data
        output_dir=out,
        image_size=64,
        batch_size=8,
        max_steps=200,
        eval_steps=100,
        overwrite=True,
    )
    result = train(config)
    print(
        f"mean IoU {result.metrics['mean_iou']:.3f} after {result.steps} steps: {result.output_dir}"
    )


# The guard matters: segdeploy's worker processes import this script again, and a script
if __name__ == "__main__":
    main()
